"""CUDA-only: short LongPO runs through pretrain_longpo.py (skipped without CUDA).

Every launch sizes itself to the visible GPUs (one H200 is enough). The runs start from the
CONVERTED base checkpoint (written with the local layer spec), so the TE runs also prove that a
local-spec checkpoint loads into a TE model through ``train()``.
"""

import pytest
import torch

from megatron_longpo.testing.e2e import read_metrics, run_cli, torchrun, train_overrides
from megatron_longpo.testing.gpu import gpu_nproc, visible_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(visible_gpus() == 0, reason="needs CUDA")]


def _train_gpu(d, run, nproc=1, **extra):
    return run_cli(torchrun(nproc, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                          *train_overrides(d, run, **extra)))


def _train_losses(d, run):
    return [m["loss"] for m in read_metrics(d, run) if m["split"] == "train"]


def test_te_bf16_short_run_from_converted_checkpoint(gpu_prepared):
    pytest.importorskip("transformer_engine")
    run = "gpu_te_bf16"
    p = _train_gpu(gpu_prepared, run, **{
        "parallel.tensor_model_parallel_size": 1, "model.transformer_impl": "transformer_engine",
        "model.params_dtype": "bf16", "parallel.attention_backend": "te", "training.train_iters": 5,
        "checkpoint.save_interval": 5})
    assert "loaded" in p.stdout  # the converted (local-spec) base checkpoint
    losses = _train_losses(gpu_prepared, run)
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_fp8_steps_track_bf16(gpu_prepared):
    """FP8 (delayed scaling) training steps stay close to the bf16 steps from the same start.

    The tiny model's dims are FP8-aligned (hidden 64, ffn 192, QKV out 128: all % 16 == 0).
    """
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    common = {"parallel.tensor_model_parallel_size": 1, "model.transformer_impl": "transformer_engine",
              "model.params_dtype": "bf16", "parallel.attention_backend": "te", "training.train_iters": 4,
              "checkpoint.save_interval": 100}
    _train_gpu(gpu_prepared, "gpu_bf16_ref", **common)
    _train_gpu(gpu_prepared, "gpu_fp8", **common, **{"parallel.fp8": "hybrid", "parallel.fp8_recipe": "delayed",
                                                     "parallel.fp8_amax_history_len": 16})
    bf16, fp8 = _train_losses(gpu_prepared, "gpu_bf16_ref"), _train_losses(gpu_prepared, "gpu_fp8")
    # e4m3/e5m2 keep 3/2 mantissa bits: per-GEMM relative error ~6%, averaged over the sequence the
    # loss moves by a few 1e-2 relative; 5% bounds it without hiding a broken recipe (loss ~6.6).
    for a, b in zip(fp8, bf16):
        assert abs(a - b) <= 0.05 * abs(b), (fp8, bf16)


def test_distributed_optimizer_save_and_exact_resume(gpu_prepared):
    """Steps 3-4 after a resume from the step-2 checkpoint equal the uninterrupted steps 3-4.

    Bit-exactness of resume is proven on CPU (tests/e2e/test_train.py); on a GPU the fused
    attention backward accumulates dQ with atomics, so two separate runs may differ in the last
    bits already at step 1: compare at 1e-3 relative (a lost optimizer state or data position
    changes the loss by far more).
    """
    nproc = gpu_nproc(2)
    common = {"parallel.tensor_model_parallel_size": 1, "model.params_dtype": "bf16",
              "optim.use_distributed_optimizer": True, "checkpoint.save_interval": 2}
    run_cli(torchrun(nproc, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                   *train_overrides(gpu_prepared, "gpu_full", **common, **{"training.train_iters": 4})))
    # The same 4-step schedule, stopped after step 2 (a 2-step run would have another LR schedule).
    run_cli(torchrun(nproc, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                   *train_overrides(gpu_prepared, "gpu_part", **common, **{"training.train_iters": 4,
                                                                       "training.exit_interval": 2})))
    p = run_cli(torchrun(nproc, "pretrain_longpo.py", "--config", "examples/configs/tiny_cpu.yaml",
                       *train_overrides(gpu_prepared, "gpu_part", **common, **{"training.train_iters": 4})))
    assert "resumed from" in p.stdout
    full, part = _train_losses(gpu_prepared, "gpu_full"), _train_losses(gpu_prepared, "gpu_part")
    assert len(part) == 4 and len(full) == 4
    for a, b in zip(part[2:], full[2:]):
        assert abs(a - b) <= 1e-3 * abs(b), (part, full)


def test_full_recompute_run(gpu_prepared):
    run = "gpu_recompute"
    _train_gpu(gpu_prepared, run, **{"parallel.tensor_model_parallel_size": 1, "model.params_dtype": "bf16",
                                     "training.recompute_granularity": "full", "training.train_iters": 3})
    base = "gpu_no_recompute"
    _train_gpu(gpu_prepared, base, **{"parallel.tensor_model_parallel_size": 1, "model.params_dtype": "bf16",
                                      "training.train_iters": 3})
    # Recomputation replays the same forward: losses agree to bf16 reduction-order noise.
    for a, b in zip(_train_losses(gpu_prepared, run), _train_losses(gpu_prepared, base)):
        assert abs(a - b) <= 1e-3 * abs(b)
