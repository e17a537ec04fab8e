"""Conversion building blocks checked against independent references.

- HF config <-> ModelConfig, against transformers' own config classes (both config layouts);
- unsupported inputs fail with a message that names the field;
- the fused-QKV / fc1 row map, against a reshape-based construction of Megatron's layout;
- the streaming safetensors reader / writer, against the safetensors library.
"""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_longpo.architectures import ARCHITECTURES
from megatron_longpo.config import ModelConfig
from megatron_longpo.convert import mapping
from megatron_longpo.convert.hf_config import ConversionError, hf_to_model_config, model_config_to_hf
from megatron_longpo.convert.safetensors_io import (
    INDEX_FILE,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
    TensorSpec,
)
from megatron_longpo.testing.convert import TINY_HF, hf_config


ARCH = {name: spec.hf_class for name, spec in ARCHITECTURES.items()}


def _src(name: str, **overrides) -> dict:
    """config.json content as save_pretrained writes it for model ``name``."""
    return {**hf_config(name, **overrides).to_dict(), "architectures": [ARCH[name]]}


def _legacy(d: dict) -> dict:
    """transformers 4.x layout of a 5.x config dict."""
    d = json.loads(json.dumps(d))
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = rp if rp.get("rope_type") != "default" else None
    return d


@pytest.mark.parametrize("name", sorted(TINY_HF))
@pytest.mark.parametrize("legacy", [False, True])
def test_hf_config_to_model_config(name, legacy):
    hf = hf_config(name)
    d = hf.to_dict()
    if legacy:
        d = _legacy(d)
    cfg = hf_to_model_config(d, "fp32")
    assert cfg.arch == name
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size)
    assert (cfg.num_attention_heads, cfg.num_query_groups) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.qk_layernorm == name.startswith("qwen3")
    if name in ("qwen3_moe", "mixtral"):
        assert (cfg.num_experts, cfg.moe_router_topk) == (hf.num_local_experts, hf.num_experts_per_tok)
        assert cfg.expert_ffn_hidden_size == getattr(hf, "moe_intermediate_size", hf.intermediate_size)
        assert cfg.moe_norm_topk_prob == getattr(hf, "norm_topk_prob", True)
    else:
        assert cfg.num_experts is None
    assert cfg.vocab_size == hf.vocab_size and cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.norm_epsilon == hf.rms_norm_eps
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.add_qkv_bias == (name == "qwen2")
    want_scaling = {k: v for k, v in hf.rope_parameters.items() if k != "rope_theta"}
    assert cfg.rope_scaling == (want_scaling if want_scaling["rope_type"] != "default" else None)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("legacy", [False, True])
def test_qwen3_moe_norm_topk_prob_is_read_and_written(norm, legacy):
    """Qwen3-30B-A3B sets norm_topk_prob: true (the tiny model false): both values reach the model
    config and come back in config.json, as transformers reads it."""
    import transformers

    src = _src("qwen3_moe", norm_topk_prob=norm)
    if legacy:
        src = _legacy(src)
    cfg = hf_to_model_config(src, "fp32")
    assert cfg.moe_norm_topk_prob is norm
    out = model_config_to_hf(cfg, None, "fp32")
    assert transformers.Qwen3MoeConfig(**out).norm_topk_prob is norm


@pytest.mark.parametrize("name", sorted(TINY_HF))
@pytest.mark.parametrize("legacy", [False, True])
def test_model_config_to_hf_round_trips_and_loads_in_transformers(name, legacy):
    import transformers

    src = _src(name)
    if legacy:
        src = _legacy(src)
    cfg = hf_to_model_config(src, "fp32")
    out = model_config_to_hf(cfg, src, "fp32")
    for k, v in src.items():  # every source field survives unchanged (dtype aside)
        if k not in ("dtype", "torch_dtype"):
            assert out[k] == v, k
    assert hf_to_model_config(out, "fp32") == cfg
    # A changed ModelConfig (LongPO raises the rope base) shows up in the HF config, per transformers.
    longer = ModelConfig(**{**cfg.__dict__, "rope_theta": 1e7, "max_position_embeddings": 131072})
    fresh = model_config_to_hf(longer, None, "bf16")
    for d in (out, model_config_to_hf(longer, src, "bf16"), fresh):
        loaded = transformers.AutoConfig.for_model(**{k: v for k, v in d.items() if k != "model_type"}, model_type=d["model_type"])
        assert loaded.num_key_value_heads == cfg.num_query_groups
        assert loaded.hidden_size == cfg.hidden_size
    hf_new = transformers.AutoConfig.for_model(**fresh)
    assert hf_new.rope_parameters["rope_theta"] == 1e7 and hf_new.max_position_embeddings == 131072
    assert hf_to_model_config(fresh, "bf16") == ModelConfig(**{**longer.__dict__, "params_dtype": "bf16"})


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "not supported"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "linear"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_theta": 5e5}), "low_freq_factor"),
        (dict(sliding_window=4096, max_position_embeddings=32768), "sliding_window"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "divisible"),
    ],
)
def test_unsupported_configs_fail_clearly(change, needle):
    d = _src("mistral")
    d.update(change)
    with pytest.raises(ConversionError, match=needle):
        hf_to_model_config(d)


def test_llama_attention_bias_and_qwen2_sliding_window_rejected():
    d = _src("llama", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias"):
        hf_to_model_config(d)
    q = _src("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    with pytest.raises(ConversionError, match="sliding_window"):
        hf_to_model_config(q)
    # An unused window (use_sliding_window false, as in Qwen2.5 releases) is fine.
    hf_to_model_config(_src("qwen2", use_sliding_window=False, sliding_window=64))


@pytest.mark.parametrize(
    "name, change, field",
    [
        ("qwen3_moe", dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size"),
        ("qwen3_moe", dict(decoder_sparse_step=2), "decoder_sparse_step"),
        ("qwen3_moe", dict(mlp_only_layers=[0]), "mlp_only_layers"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=64), "use_sliding_window"),
        ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
        ("mixtral", dict(sliding_window=64), "sliding_window"),
        ("qwen3", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=64), "layer_types"),
        ("qwen3", dict(attention_bias=True), "attention_bias"),
    ],
)
def test_unsupported_family_fields_are_refused_by_name(name, change, field):
    d = {**_src(name), **change}
    with pytest.raises(ConversionError, match=f"config.json: {field}"):
        hf_to_model_config(d)


def test_moe_expert_count_missing_is_named():
    d = _src("mixtral")
    d.pop("num_local_experts")
    with pytest.raises(ConversionError, match="num_local_experts"):
        hf_to_model_config(d)


def test_hub_qwen3_moe_spelling_num_experts():
    """Hub Qwen3-MoE configs say ``num_experts`` (transformers 5 writes ``num_local_experts``)."""
    d = _src("qwen3_moe")
    d["num_experts"] = d.pop("num_local_experts")
    cfg = hf_to_model_config(d, "fp32")
    assert cfg.num_experts == 4
    assert model_config_to_hf(cfg, d, "fp32")["num_experts"] == 4


def _reference_qkv(q, k, v, groups):
    """Megatron's fused layout by reshape: [groups, (heads/groups + 2) * d, ...] -> rows."""
    per_group = lambda t, rows: t.reshape(groups, rows, *t.shape[1:])  # noqa: E731
    d = k.shape[0] // groups
    r = q.shape[0] // (groups * d)
    fused = torch.cat([per_group(q, r * d), per_group(k, d), per_group(v, d)], dim=1)
    return fused.reshape(-1, *q.shape[1:])


def _apply_pieces(cfg, hf):
    shapes = mapping.megatron_shapes(cfg)
    out = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    for p in mapping.pieces(cfg):
        out[p.megatron][p.dst[0] : p.dst[1]] = hf[p.hf][p.src[0] : p.src[1]]
    return out


@pytest.mark.parametrize("heads, groups", [(4, 4), (8, 2), (14, 2), (28, 4)])
@pytest.mark.parametrize("bias, tied", [(False, False), (True, True)])
def test_pieces_build_megatron_layout(heads, groups, bias, tied):
    d = 8
    cfg = ModelConfig(num_layers=2, hidden_size=heads * d, ffn_hidden_size=48, num_attention_heads=heads,
                      num_query_groups=groups, vocab_size=200, add_qkv_bias=bias, tie_word_embeddings=tied)
    mapping.check_coverage(cfg)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in mapping.hf_shapes(cfg).items()}
    meg = _apply_pieces(cfg, hf)
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn.", f"decoder.layers.{i}."
        ref = _reference_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], groups)
        assert torch.equal(meg[m + "self_attention.linear_qkv.weight"], ref)
        if bias:
            ref_b = _reference_qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], groups)
            assert torch.equal(meg[m + "self_attention.linear_qkv.bias"], ref_b)
        fc1 = torch.cat([hf[f"model.layers.{i}.mlp.gate_proj.weight"], hf[f"model.layers.{i}.mlp.up_proj.weight"]])
        assert torch.equal(meg[m + "mlp.linear_fc1.weight"], fc1)
        assert torch.equal(meg[m + "mlp.linear_fc2.weight"], hf[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(meg[m + "pre_mlp_layernorm.weight"], hf[f"model.layers.{i}.post_attention_layernorm.weight"])
    emb = meg["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 256 and torch.equal(emb[:200], hf["model.embed_tokens.weight"])
    assert ("output_layer.weight" in meg) == (not tied)
    # Each query head's rows sit in its group's block, followed by that group's k and v.
    per = heads // groups
    j = heads - 1
    gq = j // per
    row = gq * (per + 2) * d + (j % per) * d
    assert torch.equal(meg["decoder.layers.0.self_attention.linear_qkv.weight"][row : row + d],
                       hf["model.layers.0.self_attn.q_proj.weight"][j * d : (j + 1) * d])


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(13, generator=g),
        "c.half": torch.randn(3, 4, 2, generator=g).to(torch.float16),
        "d.empty": torch.zeros(0, 4),
    }


def test_reader_matches_safetensors_library(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with SafetensorsCheckpoint(tmp_path) as r:
        assert set(r.entries) == set(ts)
        for n, t in ts.items():
            got = r.read(n)
            assert got.dtype == t.dtype and torch.equal(got, t), n
        part = torch.empty(3, 5, dtype=torch.bfloat16)
        r.read_rows("a.weight", 2, 5, part)
        assert torch.equal(part, ts["a.weight"][2:5])
        cast = torch.empty(4, 5, dtype=torch.float32)  # cast while reading
        r.read_rows("a.weight", 3, 7, cast)
        assert torch.equal(cast, ts["a.weight"][3:7].float())


def test_writer_output_reads_back_with_safetensors_library(tmp_path):
    ts = _tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=80)  # forces several shards
    for n, t in ts.items():
        w.write(n, t)
    w.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    for f in files:
        with safe_open(str(tmp_path / f), framework="pt") as sf:
            assert sf.metadata() == {"format": "pt"}
            for n in sf.keys():
                assert index["weight_map"][n] == f
                got = sf.get_tensor(n)
                assert got.dtype == ts[n].dtype and torch.equal(got, ts[n]), n
    with pytest.raises(ValueError, match="expected"):
        ShardedSafetensorsWriter(tmp_path / "x", specs, 10**6).write("b.bias", ts["b.bias"])  # wrong order


def test_reader_reports_truncated_missing_and_corrupt_shards(tmp_path):
    ts = _tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=80)
    for n, t in ts.items():
        w.write(n, t)
    w.close()
    first, last = w.files[0], w.files[-1]
    SafetensorsCheckpoint(tmp_path)  # intact: fine
    data = (tmp_path / last).read_bytes()
    (tmp_path / last).write_bytes(data[:-3])
    with pytest.raises(ConversionError, match=f"{last}: truncated"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / last).write_bytes(data)
    raw = (tmp_path / first).read_bytes()
    (tmp_path / first).write_bytes(struct.pack("<Q", 10**12) + raw[8:])
    with pytest.raises(ConversionError, match=f"{first}: corrupt or truncated safetensors header"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / first).unlink()
    with pytest.raises(ConversionError, match=f"{first}.*missing"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path)
