"""The architecture table (megatron_longpo/architectures.py) is the one family list.

- every place that enumerates families derives from it (config Literal, tiny test models, tiny HF
  models, the HF class map);
- each family's parameter template tiles every HF tensor and every Megatron row (check_coverage),
  and the MoE template places expert e's gate/up/down where Megatron's SequentialMLP expects them;
- MoE fields are checked against the family and the expert layout by config validation.
"""

import typing

import pytest
import torch

from megatron_longpo.architectures import ARCH_NAMES, ARCHITECTURES
from megatron_longpo.config import ConfigError, ModelConfig, validate_model
from megatron_longpo.convert import SUPPORTED_ARCHITECTURES, mapping
from megatron_longpo.testing.convert import TINY_HF
from megatron_longpo.testing.models import TINY_ARCHS, parallel_config, tiny_model_config


def test_every_family_list_derives_from_the_table():
    literal = typing.get_args(typing.get_type_hints(ModelConfig)["arch"])
    assert tuple(literal) == ARCH_NAMES
    assert set(TINY_ARCHS) == set(TINY_HF) == set(ARCH_NAMES)
    assert SUPPORTED_ARCHITECTURES == {a.hf_class: a.arch for a in ARCHITECTURES.values()}
    for name, (cls_name, _) in TINY_HF.items():
        assert cls_name == ARCHITECTURES[name].hf_class.replace("ForCausalLM", "Config")


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_template_tiles_every_tensor(name):
    cfg = tiny_model_config(name)
    mapping.check_coverage(cfg)
    hf, meg = mapping.hf_shapes(cfg), mapping.megatron_shapes(cfg)
    assert [n for u in mapping.units(cfg) for n in u.hf] == list(hf)
    assert sorted(n for u in mapping.units(cfg) for n in u.megatron) == sorted(meg)
    spec = ARCHITECTURES[name]
    assert any("q_norm" in n for n in hf) == spec.qk_norm
    assert any(n.endswith("q_proj.bias") for n in hf) == spec.qkv_bias


@pytest.mark.parametrize("name, block, names", [("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
                                                ("mixtral", "block_sparse_moe", ("w1", "w3", "w2"))])
def test_expert_pieces(name, block, names):
    cfg = tiny_model_config(name)
    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in mapping.hf_shapes(cfg).items()}
    meg = {n: torch.full(s, float("nan")) for n, s in mapping.megatron_shapes(cfg).items()}
    for p in mapping.pieces(cfg):
        meg[p.megatron][p.dst[0] : p.dst[1]] = hf[p.hf][p.src[0] : p.src[1]]
    gate, up, down = names
    for i in range(cfg.num_layers):
        h, m = f"model.layers.{i}.{block}.", f"decoder.layers.{i}.mlp."
        assert torch.equal(meg[m + "router.weight"], hf[h + "gate.weight"])
        for e in range(cfg.num_experts):
            x = f"{m}experts.local_experts.{e}."
            fc1 = torch.cat([hf[f"{h}experts.{e}.{gate}.weight"], hf[f"{h}experts.{e}.{up}.weight"]])
            assert torch.equal(meg[x + "linear_fc1.weight"], fc1)
            assert torch.equal(meg[x + "linear_fc2.weight"], hf[f"{h}experts.{e}.{down}.weight"])
    assert meg["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"].shape == (2 * cfg.expert_ffn_hidden_size, 64)


@pytest.mark.parametrize(
    "name, model_kw, parallel_kw, needle",
    [
        ("qwen3_moe", dict(num_experts=None), {}, "set model.num_experts"),
        ("qwen3", dict(num_experts=4), {}, "is dense"),
        ("mixtral", dict(moe_router_topk=5), {}, "moe_router_topk"),
        ("mixtral", {}, dict(ep=3), "divisible by parallel.expert_model_parallel_size"),
        ("mixtral", {}, dict(tp=2), "sequence_parallel"),
        ("qwen3", {}, dict(ep=2), "needs a mixture-of-experts model"),
        ("mixtral", dict(moe_aux_loss_coeff=-1.0), {}, "moe_aux_loss_coeff"),
    ],
)
def test_moe_config_rules(name, model_kw, parallel_kw, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_model(tiny_model_config(name, **model_kw), parallel_config(**parallel_kw))


def test_moe_config_valid_layouts():
    validate_model(tiny_model_config("mixtral"), parallel_config(ep=2))
    validate_model(tiny_model_config("qwen3_moe"), parallel_config(tp=2, ep=2, sequence_parallel=True))
