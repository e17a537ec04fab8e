"""The released-recipe example configs: the authors' hyper-parameters, valid layouts, memory fit."""

from pathlib import Path

import pytest

from megatron_longpo.config import ConfigError, load_config, validate
from megatron_longpo.training.memory_model import GiB, estimate_memory

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


@pytest.mark.parametrize("name, samples", [("mistral7b_128k_released", 45_000), ("qwen2.5_7b_128k_released", 32_000)])
def test_released_recipe_hyperparameters(name, samples):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate(cfg, world_size=8)
    o = cfg.optim
    assert (o.optimizer, o.lr, o.lr_decay_style, o.lr_warmup_fraction, o.weight_decay) == ("rmsprop", 5e-7, "cosine", 0.1, 0.0)
    assert (cfg.loss.beta, cfg.loss.lam, cfg.training.global_batch_size) == (0.01, 0.01, 8)
    assert cfg.training.train_iters == samples // 8 and cfg.model.rope_theta == 1e7
    assert cfg.data.max_seq_length >= 128 * 1024


def test_qwen25_7b_fits_8x80gb_at_128k_and_tp_follows_the_heads():
    cfg = load_config(CONFIGS / "qwen2.5_7b_128k_released.yaml")
    est = estimate_memory(cfg, 8)
    assert 7.5e9 < est.params < 7.7e9  # Qwen2.5-7B: 7.6B parameters
    assert est.total < 72 * GiB  # 8 GiB headroom on an 80 GB GPU
    for tp in (1, 2, 4):  # 28 query heads, 4 KV heads
        validate(load_config(CONFIGS / "qwen2.5_7b_128k_released.yaml",
                             [f"--parallel.tensor_model_parallel_size={tp}", f"--parallel.context_parallel_size={8 // tp}",
                              f"--parallel.sequence_parallel={'true' if tp > 1 else 'false'}"]), 8)
    with pytest.raises(ConfigError):
        validate(load_config(CONFIGS / "qwen2.5_7b_128k_released.yaml",
                             ["--parallel.tensor_model_parallel_size=8", "--parallel.context_parallel_size=1"]), 8)


@pytest.mark.parametrize("name, params", [("qwen3_8b_128k", (8.1e9, 8.3e9)), ("qwen3_30b_a3b_128k", (30.4e9, 30.7e9))])
def test_qwen3_configs_fit_8x80gb_at_128k(name, params):
    """Not run on GPUs (docs/scaling.md): the layouts the memory model says fit 8 x 80 GB at 128K."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    validate(cfg, world_size=8)
    est = estimate_memory(cfg, 8)
    assert params[0] < est.params < params[1]  # Qwen3-8B: 8.2B; Qwen3-30B-A3B: 30.5B
    assert est.total < 72 * GiB
    assert cfg.data.max_seq_length >= 128 * 1024
