"""Recompute options: validation, the estimator's choices, and the shipped configs use the fastest
choice that fits (by the memory model; no GPU has measured these configs yet)."""

from pathlib import Path

import pytest

from megatron_longpo.config import ConfigError, LongPOConfig, load_config, validate
from megatron_longpo.training.memory_model import (
    GiB,
    cheapest_recompute,
    estimate_memory,
    estimate_step_seconds,
    recompute_choices,
    recompute_forward_fraction,
    recompute_label,
    tp_collective_bytes,
)

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
SHIPPED = [("mistral7b_128k", 8), ("mistral7b_256k", 16), ("mistral7b_512k", 32), ("mistral7b_128k_released", 8),
           ("qwen2.5_7b_128k_released", 8)]


@pytest.mark.parametrize("name,world", SHIPPED)
def test_shipped_configs_use_the_fastest_recompute_that_fits(name, world):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate(cfg, world)
    best = cheapest_recompute(cfg, world)
    assert best is not None and recompute_label(cfg) == recompute_label(best)
    assert estimate_memory(cfg, world).total <= 72 * GiB
    # and it is faster than recomputing every layer, which the configs shipped before
    full = load_config(CONFIGS / f"{name}.yaml", ["--training.recompute_method=uniform", "--training.recompute_num_layers=1"])
    assert estimate_step_seconds(cfg, world, 400) < estimate_step_seconds(full, world, 400)


def test_choices_are_ordered_by_extra_work_and_fp8_delayed_drops_layernorm():
    cfg = load_config(CONFIGS / "mistral7b_128k.yaml")
    fractions = [recompute_forward_fraction(o) for o in recompute_choices(cfg)]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert not any("layernorm" in recompute_label(o) for o in recompute_choices(cfg))  # delayed FP8 recipe
    cfg.parallel.fp8_recipe = "tensorwise"
    assert any("layernorm" in recompute_label(o) for o in recompute_choices(cfg))


def test_recompute_validation():
    cfg = LongPOConfig()
    cfg.training.recompute_granularity = "selective"
    cfg.training.recompute_modules = ["attention"]
    with pytest.raises(ConfigError, match="training.recompute_modules must be a non-empty list of"):
        validate(cfg)
    cfg.training.recompute_modules = ["mlp", "layernorm"]
    validate(cfg)
    cfg.training.recompute_granularity = "full"
    cfg.training.recompute_method = "block"
    cfg.training.recompute_num_layers = cfg.model.num_layers + 1
    with pytest.raises(ConfigError, match=r"training.recompute_num_layers \(3\) must be in \[1, model.num_layers=2\]"):
        validate(cfg)
    cfg = load_config(CONFIGS / "mistral7b_128k.yaml", ["--training.recompute_granularity=selective",
                                                          "--training.recompute_modules=[layernorm]"])
    with pytest.raises(ConfigError, match="layernorm cannot run with parallel.fp8_recipe=delayed"):
        validate(cfg, 8)


def test_tp_collective_bytes_by_hand():
    """4 SP collectives per layer forward + 4 backward (+4 per recomputed forward), ring (tp-1)/tp."""
    cfg = LongPOConfig()  # 2 layers, hidden 64, two_sequences: 2 rows per pair
    cfg.model.params_dtype = "bf16"
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel = 2, True
    cfg.data.max_seq_length = 128
    cfg.training.global_batch_size = 2  # dp 1 on 2 GPUs: 2 micro-batches
    tensor = 2 * 128 * 64 * 2  # rows x tokens x hidden x bf16 bytes
    assert tp_collective_bytes(cfg, 2) == 2 * 2 * 8 * tensor / 2
    cfg.training.recompute_granularity = "full"  # + the forward's 4 collectives again
    assert tp_collective_bytes(cfg, 2) == 2 * 2 * 12 * tensor / 2
    cfg.parallel.tensor_model_parallel_size = 1
    assert tp_collective_bytes(cfg, 2) == 0


def test_tp_comm_overlap_rules():
    cfg = load_config(CONFIGS / "mistral7b_128k.yaml", ["--parallel.tp_comm_overlap=true"])
    validate(cfg, 8)  # TP4, SP, TE layers
    for override, needle in (("--parallel.sequence_parallel=false", "needs parallel.tensor_model_parallel_size > 1"),
                             ("--model.transformer_impl=local", "needs Transformer Engine layers")):
        bad = load_config(CONFIGS / "mistral7b_128k.yaml", ["--parallel.tp_comm_overlap=true", override,
                                                              "--parallel.fp8=null"])
        with pytest.raises(ConfigError, match=needle):
            validate(bad, 8)


def test_tp_comm_overlap_refused_without_te_layers_at_build():
    from megatron_longpo.models.provider import transformer_config  # deferred: torch / megatron-core

    cfg = LongPOConfig()
    cfg.parallel.tp_comm_overlap = True
    with pytest.raises(ConfigError, match="tp_comm_overlap needs the Transformer Engine layer spec with CUDA"):
        transformer_config(cfg.model, cfg.parallel, impl="local")
