"""HF <-> Megatron conversion of tiny random Llama / Mistral / Qwen2 models, checked against transformers.

- Megatron logits (checkpoint loaded at TP=1 and TP=2 through dist_checkpointing) equal the HF
  transformers logits over the true vocabulary (fp32);
- HF -> Megatron -> HF gives back every tensor bit for bit, config.json and the tokenizer;
- a bf16 conversion round-trips bit-exactly and --verify passes;
- the checkpoint loads at CP=2 with the same weights as at TP=1.
Variants cover GQA ratios 1 / 4 / 7, tied and untied embeddings, Qwen2 QKV bias, llama3 rope
scaling, both config.json layouts, single-file and sharded safetensors, Qwen3-MoE routers with
norm_topk_prob false and true (Qwen3-30B-A3B), Mixtral.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_longpo.testing.convert import CORPUS, build_tiny_hf, hf_reference_logits
from megatron_longpo.testing.distributed import run_distributed
from megatron_longpo.testing.models import parallel_config, random_tokens

pytestmark = pytest.mark.distributed

# name -> build_tiny_hf options
VARIANTS = {
    "llama": dict(legacy_config=True),  # MHA (ratio 1), untied, llama3 rope scaling, 4.x config layout
    "mistral": dict(max_shard_size="60KB"),  # GQA 4, untied, sharded safetensors + index, vocab pad differs per TP
    "qwen2": dict(),  # GQA 7, QKV bias, tied embeddings
    "qwen3": dict(),  # q/k norm, head_dim 24 != hidden / heads, tied
    "qwen3_untied": dict(family="qwen3", tie_word_embeddings=False),
    "qwen3_moe": dict(),  # 4 experts top-2, norm_topk_prob false, q/k norm
    "qwen3_moe_norm_topk": dict(family="qwen3_moe", norm_topk_prob=True),  # Qwen3-30B-A3B's router
    "mixtral": dict(max_shard_size="60KB"),  # 4 experts top-2 renormalised, GQA 4, sharded safetensors
}


def _convert(hf_dir: str, work: str, dtype: str, verify: bool = False) -> dict:
    from megatron_longpo.convert import convert_hf_to_megatron, convert_megatron_to_hf

    imp = convert_hf_to_megatron(hf_dir, f"{work}/megatron", dtype=dtype, verify=verify, progress=False)
    exp = convert_megatron_to_hf(f"{work}/megatron", f"{work}/hf_back", max_shard_size="50KB", verify=verify, progress=False)
    return dict(verify=imp.verify, verify_back=exp.verify, tokenizer_files=exp.tokenizer_files)


def _logits(ckpt: str, tp: int, tokens: torch.Tensor, ep: int = 1) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = dataclasses.replace(read_model_config(ckpt), params_dtype="fp32", transformer_impl="local")
    pcfg = parallel_config(tp=tp, ep=ep, sequence_parallel=tp > 1 and cfg.num_experts is not None)  # MoE + TP needs SP
    init_model_parallel(pcfg)
    set_seed(123)  # random init is overwritten by the load
    model = build_model(cfg, pcfg)
    load_model_checkpoint(ckpt, model, cfg)
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, pos, None))  # [b, s, V_pad]
    return logits[..., : cfg.vocab_size]


_CACHE: dict[str, Path] = {}


def _converted(name: str, tmp_path_factory) -> Path:
    """Build the tiny HF model ``name`` and convert it there and back (once per module)."""
    if name not in _CACHE:
        work = tmp_path_factory.mktemp(f"conv_{name}")
        opts = dict(VARIANTS[name])
        build_tiny_hf(work / "hf", opts.pop("family", name), **opts)
        run_distributed(_convert, 1, args=(str(work / "hf"), str(work), "fp32"))
        _CACHE[name] = work
    return _CACHE[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_megatron_logits_match_transformers_tp1_tp2(name, tmp_path_factory):
    work = _converted(name, tmp_path_factory)
    cfg = json.loads((work / "hf" / "config.json").read_text())
    tokens = random_tokens(2, 24, cfg["vocab_size"], seed=7)
    ref = hf_reference_logits(work / "hf", tokens)
    assert ref.abs().max() > 1.0, "logits too small for a meaningful comparison"
    (tp1,) = run_distributed(_logits, 1, args=(str(work / "megatron"), 1, tokens))
    tp2 = run_distributed(_logits, 2, args=(str(work / "megatron"), 2, tokens))
    for got in [tp1, *tp2]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen3_moe_norm_topk", "mixtral"])
def test_moe_logits_match_transformers_at_ep2(name, tmp_path_factory):
    """The converted MoE checkpoint loaded with experts split over 2 ranks (EP=2: tokens leave
    their rank for the expert's) gives HF's logits; every expert of every layer receives tokens."""
    work = _converted(name, tmp_path_factory)
    cfg = json.loads((work / "hf" / "config.json").read_text())
    tokens = random_tokens(2, 48, cfg["vocab_size"], seed=11)
    ref, counts = _hf_logits_and_expert_counts(work / "hf", tokens)
    assert (counts > 0).all(), f"an expert received no tokens: {counts.tolist()}"
    outs = run_distributed(_logits, 2, args=(str(work / "megatron"), 1, tokens, 2))
    for got in outs:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=3e-5)


@torch.no_grad()
def _hf_logits_and_expert_counts(hf_dir: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF fp32 logits and, per layer and expert, how many tokens HF's router sent there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager").eval()
    out = model(input_ids=tokens, use_cache=False, output_router_logits=True)
    k = model.config.num_experts_per_tok
    counts = torch.stack([torch.bincount(r.topk(k, -1).indices.reshape(-1), minlength=r.shape[-1])
                          for r in out.router_logits])
    return out.logits.float(), counts


def _hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hf_megatron_hf_round_trip_is_bit_exact(name, tmp_path_factory):
    from transformers import AutoTokenizer

    work = _converted(name, tmp_path_factory)
    src, back = _hf_tensors(work / "hf"), _hf_tensors(work / "hf_back")
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert json.loads((work / "hf_back" / "config.json").read_text()) == json.loads((work / "hf" / "config.json").read_text())
    assert len(list((work / "hf_back").glob("model-*.safetensors"))) > 1  # sharded output + index
    tok_a = AutoTokenizer.from_pretrained(str(work / "hf"))
    tok_b = AutoTokenizer.from_pretrained(str(work / "hf_back"))
    assert tok_b(CORPUS)["input_ids"] == tok_a(CORPUS)["input_ids"]
    assert AutoTokenizer.from_pretrained(str(work / "megatron" / "tokenizer"))(CORPUS[0])["input_ids"] == tok_a(CORPUS[0])["input_ids"]


@pytest.mark.parametrize("name", ["mistral", "mixtral"])
def test_bf16_round_trip_and_verify(name, tmp_path):
    from megatron_longpo.checkpoint import read_meta

    build_tiny_hf(tmp_path / "hf", name, dtype=torch.bfloat16)
    (res,) = run_distributed(_convert, 1, args=(str(tmp_path / "hf"), str(tmp_path), "bf16", True))
    for v in (res["verify"], res["verify_back"]):  # both directions, bf16 weights run in fp32
        assert v.ok and v.max_abs_diff < 1e-4 and v.max_abs_logit > 1.0, v
    meta = read_meta(tmp_path / "megatron")
    assert meta.model.params_dtype == "bf16" and meta.source["dtype"] == "bfloat16"
    assert meta.tokenizer is not None and "tokenizer.json" in meta.tokenizer["files"]
    src, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "hf_back")
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], t), k


def _resave_at_tp2(src: str, dst: str) -> None:
    """What training does: load the converted checkpoint at TP=2, save a later iteration elsewhere."""
    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config, save_model_checkpoint
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = read_model_config(src)
    pcfg = parallel_config(tp=2)
    init_model_parallel(pcfg)
    set_seed(5)
    model = build_model(cfg, pcfg)
    meta = load_model_checkpoint(src, model, cfg)
    save_model_checkpoint(dst, model, cfg, iteration=3, extra_meta={"source": meta.source, "tokenizer": meta.tokenizer})


def test_export_after_tp2_save_is_bit_exact(tmp_path_factory, tmp_path):
    # Vocab 300 pads to 384 rows at TP=1 and 512 at TP=2: export must drop the TP=2 padding.
    work = _converted("mistral", tmp_path_factory)
    run_distributed(_resave_at_tp2, 2, args=(str(work / "megatron"), str(tmp_path / "run")))
    run_distributed(_export, 1, args=(str(tmp_path / "run"), str(tmp_path / "hf"), str(work / "megatron" / "tokenizer")))
    src, back = _hf_tensors(work / "hf"), _hf_tensors(tmp_path / "hf")
    assert set(back) == set(src)
    for k, t in src.items():
        assert torch.equal(back[k], t), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((work / "hf" / "config.json").read_text())
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def _export(ckpt: str, out: str, tokenizer_dir: str) -> None:
    from megatron_longpo.convert import convert_megatron_to_hf

    convert_megatron_to_hf(ckpt, out, tokenizer_dir=tokenizer_dir, progress=False)


class _NoCoreAttention(torch.nn.Module):
    """Stands in for the project's CP attention: this test only loads weights at CP=2."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def forward(self, *args, **kwargs):
        raise NotImplementedError


def _params_at(ckpt: str, tp: int, cp: int) -> dict:
    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import gather_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = dataclasses.replace(read_model_config(ckpt), params_dtype="fp32", transformer_impl="local")
    pcfg = parallel_config(tp=tp, cp=cp)
    g = init_model_parallel(pcfg)
    set_seed(99)
    model = build_model(cfg, pcfg, core_attention=_NoCoreAttention if cp > 1 else None)
    load_model_checkpoint(ckpt, model, cfg)
    return gather_full_state_dict(model, g.tp_group, cfg.vocab_size)


def test_checkpoint_loads_at_cp2(tmp_path_factory):
    work = _converted("mistral", tmp_path_factory)
    (ref,) = run_distributed(_params_at, 1, args=(str(work / "megatron"), 1, 1))
    for got in run_distributed(_params_at, 2, args=(str(work / "megatron"), 1, 2)):
        assert set(got) == set(ref)
        for k, t in ref.items():
            assert torch.equal(got[k], t), k


def _save_at_ep(out: str, ep: int, tp: int) -> dict:
    """A randomly initialised Mixtral on EP=ep x TP=tp, saved; returns its full-layout weights."""
    from megatron_longpo.checkpoint import save_model_checkpoint
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import ExpertShards, gather_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed
    from megatron_longpo.testing.models import tiny_model_config

    cfg = tiny_model_config("mixtral")
    pcfg = parallel_config(tp=tp, ep=ep, sequence_parallel=tp > 1)
    g = init_model_parallel(pcfg)
    set_seed(5)
    model = build_model(cfg, pcfg)
    save_model_checkpoint(out, model, cfg)
    return gather_full_state_dict(model, g.tp_group, cfg.vocab_size, experts=ExpertShards.of(g))


def _load_at_ep(ckpt: str, ep: int) -> dict:
    from megatron_longpo.checkpoint import load_model_checkpoint, read_model_config
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.models.sharding import ExpertShards, gather_full_state_dict
    from megatron_longpo.runtime.distributed import init_model_parallel, set_seed

    cfg = read_model_config(ckpt)
    pcfg = parallel_config(ep=ep)
    g = init_model_parallel(pcfg)
    set_seed(77)  # a different init: the load must overwrite every weight
    model = build_model(cfg, pcfg)
    load_model_checkpoint(ckpt, model, cfg)
    return gather_full_state_dict(model, g.tp_group, cfg.vocab_size, experts=ExpertShards.of(g))


def test_moe_checkpoint_saved_at_ep2_loads_at_ep1(tmp_path):
    """Experts saved by 2 EP ranks (each holding 2 of 4) load whole into one process, and back."""
    saved = run_distributed(_save_at_ep, 2, args=(str(tmp_path / "ep2"), 2, 1))[0]
    (at_ep1,) = run_distributed(_load_at_ep, 1, args=(str(tmp_path / "ep2"), 1))
    assert set(at_ep1) == set(saved) and sum("local_experts" in k for k in saved) == 2 * 4 * 2
    for k, t in saved.items():
        assert torch.equal(at_ep1[k], t), k
    for got in run_distributed(_load_at_ep, 2, args=(str(tmp_path / "ep2"), 2)):
        for k, t in saved.items():
            assert torch.equal(got[k], t), k


def _streamed_round_trip(hf_dir: str, work: str) -> dict:
    """Convert there and back, recording what each direction holds: at each fill of a saved tensor
    (import), how many tensors filled before still hold memory; at each load (export), its keys."""
    from megatron_longpo.convert import hf_to_megatron, megatron_to_hf
    from megatron_longpo.convert import mapping

    held_at_fill: list[int] = []
    loads: list[list[str]] = []
    real_filler, real_load = hf_to_megatron.hf_filler, megatron_to_hf.load_sharded

    def filler(reader, cfg, saved, bar=None):
        fill, filled = real_filler(reader, cfg, saved, bar), []

        def recording(st):
            held_at_fill.append(sum(t.tensor.untyped_storage().nbytes() > 0 for t in filled))
            fill(st)
            filled.append(st)

        return recording

    def load(request, iter_dir, **kw):
        loads.append(sorted({(v[0] if isinstance(v, list) else v).key for v in request.values()}))
        return real_load(request, iter_dir, **kw)

    hf_to_megatron.hf_filler, megatron_to_hf.load_sharded = filler, load
    try:
        imp = hf_to_megatron.convert_hf_to_megatron(hf_dir, f"{work}/megatron", dtype="bf16", progress=False)
        megatron_to_hf.convert_megatron_to_hf(f"{work}/megatron", f"{work}/hf_back", progress=False)
    finally:
        hf_to_megatron.hf_filler, megatron_to_hf.load_sharded = real_filler, real_load
    return dict(held_at_fill=held_at_fill, loads=loads, params=len(mapping.megatron_shapes(imp.model)))


def test_conversion_streams_one_tensor_or_one_key_at_a_time(tmp_path):
    """Memory is bounded by one tensor (import) or one stacked key (export), not the model: the
    import fills each saved tensor (fc1 as two halves) only after the previous one was written and
    freed; the export loads one dist-checkpoint key per read, each once. The result is bit-exact."""
    build_tiny_hf(tmp_path / "hf", "qwen3_moe", dtype=torch.bfloat16)
    (rec,) = run_distributed(_streamed_round_trip, 1, args=(str(tmp_path / "hf"), str(tmp_path)))
    assert len(rec["held_at_fill"]) > rec["params"]  # every parameter, fc1s in two halves
    assert max(rec["held_at_fill"]) == 0
    keys = [k for ks in rec["loads"] for k in ks]
    assert all(len(ks) == 1 for ks in rec["loads"]) and len(keys) == len(set(keys)) > 10
    assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in keys
    src, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "hf_back")
    assert set(back) == set(src) and all(torch.equal(back[k], t) for k, t in src.items())
