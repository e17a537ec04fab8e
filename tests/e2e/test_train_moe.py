"""pretrain_longpo.py on a mixture-of-experts model (tiny Mixtral: 4 experts, top-2, aux loss on)
with expert parallelism EP=2 under torchrun, then its checkpoint continued at EP=1 (weights into
the new layout; a full resume across EP sizes is refused with a clear error, because Megatron-Core
0.16.1 cannot re-shard the MoE optimizer state). moe/aux_loss is logged every step.
"""

import shutil

import pytest
import torch

from megatron_longpo.testing.e2e import PY, read_metrics, run_cli, torchrun, train_overrides
from megatron_longpo.testing.reference import SAMPLE_TOKENIZER, make_hf_model

pytestmark = pytest.mark.slow

MOE = {"model.arch": "mixtral", "model.ffn_hidden_size": 80, "model.num_attention_heads": 8, "model.num_experts": 4,
       "model.moe_router_topk": 2, "model.moe_aux_loss_coeff": 0.01, "model.rope_theta": 1e6,
       "parallel.tensor_model_parallel_size": 1}


def test_moe_trains_with_ep2_and_continues_at_ep1(tmp_path):
    d = tmp_path
    run_cli([PY, "tools/preprocess_data.py", "--input", "examples/data/sample_longpo.jsonl", "--tokenizer",
             "examples/data/tokenizer.model", "--output-prefix", d / "data/train", "--max-seq-length", "2048",
             "--no-progress"])
    hf = make_hf_model(d / "hf", seed=3, family="mixtral", max_position_embeddings=4096)
    shutil.copy(SAMPLE_TOKENIZER, hf / "tokenizer.model")
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

    # A full resume at EP=1 is refused before any work, naming the layouts.
    over = train_overrides(d, "ep2", **MOE, **{"training.train_iters": 6})
    p = run_cli(torchrun(2, "pretrain_longpo.py", *cfg, *over), check=False)
    assert p.returncode != 0 and "same cp/dp/ep" in p.stdout + p.stderr
    # Weights saved at EP=2 continue at EP=1 (one process holds all 4 experts).
    run_cli(torchrun(1, "pretrain_longpo.py", *cfg, *train_overrides(
        d, "ep1", **MOE, **{"checkpoint.load": d / "ep2" / "ckpt", "checkpoint.finetune": "true",
                             "training.train_iters": 2})))
    after = [m for m in read_metrics(d, "ep1") if m["split"] == "train"]
    assert len(after) == 2 and after[0]["loss"] < steps[0]["loss"]  # starts from the trained weights
