"""pretrain_longpo.py on a mixture-of-experts model (tiny Mixtral: 4 experts, top-2, aux loss on)
with expert parallelism EP=2 under torchrun, then its step-2 checkpoint resumed in full (model,
optimizer, scheduler, data position) at EP=1: steps 3-4 equal the uninterrupted EP=2 run's.
moe/aux_loss is logged every step. (EP=1 -> EP=2 and the optimizer moments tensor by tensor:
tests/distributed/test_checkpointing.py.)
"""

import json

import pytest
import torch

from megatron_longpo.testing.e2e import PY, read_metrics, run_cli, torchrun, train_overrides
from megatron_longpo.testing.reference import make_hf_model

pytestmark = pytest.mark.slow

MOE = {"model.arch": "mixtral", "model.ffn_hidden_size": 80, "model.num_attention_heads": 8, "model.num_experts": 4,
       "model.moe_router_topk": 2, "model.moe_aux_loss_coeff": 0.01, "model.rope_theta": 1e6,
       "parallel.tensor_model_parallel_size": 1}
KEYS = ("loss", "nll_loss", "pref_loss", "rewards/margins", "lr", "grad_norm", "moe/aux_loss")


def test_moe_trains_with_ep2_and_resumes_at_ep1(tmp_path):
    d = tmp_path
    run_cli([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
             "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
             "--no-progress"])
    hf = make_hf_model(d / "hf", seed=3, family="mixtral", max_position_embeddings=4096)
    run_cli([PY, "tools/convert_hf_to_megatron.py", "--hf-dir", hf, "--out", d / "base", "--dtype", "fp32", "--no-progress"])
    run_cli(torchrun(2, "tools/precompute_reference.py", "--load", d / "base", "--data", d / "data/train",
                     "--output", d / "ref_cache", "--no-progress"))
    cfg = ["--config", "examples/configs/tiny_cpu.yaml"]
    run_cli(torchrun(2, "pretrain_longpo.py", *cfg, *train_overrides(
        d, "ep2", **MOE, **{"parallel.expert_model_parallel_size": 2, "training.train_iters": 4,
                             "checkpoint.save_interval": 2})))
    steps = [m for m in read_metrics(d, "ep2") if m["split"] == "train"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["moe/aux_loss"] > 0 and torch.isfinite(torch.tensor(m["loss"])) for m in steps)

    # The full state of step 2 (saved at EP=2) continues at EP=1 exactly like the EP=2 run.
    p = run_cli(torchrun(2, "pretrain_longpo.py", *cfg, *train_overrides(
        d, "ep1", **MOE, **{"checkpoint.load": d / "ep2" / "ckpt" / "iter_0000002", "checkpoint.finetune": "false",
                             "training.train_iters": 4})))
    assert "(full state)" in p.stdout
    layout = [json.loads((d / run / "ckpt/iter_0000004/longpo_meta.json").read_text())["train_state"]["layout"]
              for run in ("ep2", "ep1")]
    assert [x["ep"] for x in layout] == [2, 1] and layout[0]["dp"] == layout[1]["dp"] == 2
    resumed = [m for m in read_metrics(d, "ep1") if m["split"] == "train"]
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(steps[2:], resumed):
        for k in KEYS:
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
