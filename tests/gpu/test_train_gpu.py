"""CUDA-only: a short bf16 LongPO run with the Transformer Engine layer spec (skipped without CUDA)."""

import pytest
import torch

from tests.e2e.test_train import _metrics, _train, prepared  # noqa: F401  (module fixture)

pytestmark = pytest.mark.gpu


def test_te_bf16_short_run(prepared):  # noqa: F811
    pytest.importorskip("transformer_engine")
    run = "gpu_te_bf16"
    _train(prepared, run, nproc=1, **{
        "parallel.tensor_model_parallel_size": 1, "model.transformer_impl": "transformer_engine",
        "model.params_dtype": "bf16", "parallel.attention_backend": "te", "training.train_iters": 5,
        "checkpoint.save_interval": 5})
    steps = [m for m in _metrics(prepared, run) if m["split"] == "train"]
    assert len(steps) == 5 and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
