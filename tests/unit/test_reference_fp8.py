"""Defect 5: the reference precompute can run in the policy's FP8 recipe, and the first step's
rewards (before any update) are logged as step 0."""

from megatron_longpo.config import ModelConfig, ParallelConfig
from megatron_longpo.reference.precompute import fp8_reference_errors
from megatron_longpo.reference.precompute_args import build_arg_parser
from megatron_longpo.training.loop import step0_metrics


def test_precompute_fp8_options_and_rules():
    a = build_arg_parser().parse_args(["--load", "c", "--data", "d", "--output", "o", "--fp8", "hybrid",
                                       "--fp8-recipe", "tensorwise"])
    assert (a.fp8, a.fp8_recipe) == ("hybrid", "tensorwise")
    assert build_arg_parser().parse_args(["--load", "c", "--data", "d", "--output", "o"]).fp8 is None
    fp8 = ParallelConfig(fp8="hybrid", fp8_recipe="delayed")
    good = ModelConfig(hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                       params_dtype="bf16", transformer_impl="transformer_engine")
    assert fp8_reference_errors(good, fp8) == []
    errs = fp8_reference_errors(ModelConfig(hidden_size=100, num_attention_heads=4, num_query_groups=2,
                                            params_dtype="fp32", transformer_impl="local"), fp8)
    text = "; ".join(errs)
    assert "--fp8 needs Transformer Engine layers" in text and "a bf16 checkpoint (or --params-dtype bf16)" in text
    assert "divisible by 16" in text and "parallel." not in text.replace("parallel.fp8_recipe", "")


def test_step0_metrics_keep_rewards_and_logps():
    m = {"loss": 1.0, "rewards/margins": 0.25, "rewards/chosen": 0.5, "logps/chosen": -3.0, "lr": 1e-6}
    assert step0_metrics(m) == {"rewards/margins": 0.25, "rewards/chosen": 0.5, "logps/chosen": -3.0}
