"""Command line of tools/precompute_reference.py, importable without torch or megatron-core
(``--help`` and option errors answer at once; the precompute itself lives in precompute.py)."""

from __future__ import annotations

import argparse

from megatron_longpo.config import ATTENTION_BACKENDS, DEFAULT_LOGPROB_CHUNK_SIZE
from megatron_longpo.gpu_rules import FP8_RECIPES

MODES = ("longpo", "dpo")
DEFAULT_TOKENS_PER_BATCH = 32768
DEFAULT_PAD_MULTIPLE = 64


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precompute_reference.py",
        description="Compute the reference log-prob cache of a preprocessed LongPO dataset (see docs/reference_cache.md). "
        "Run with torchrun; ranks are split into TP groups of --tp, --pp pipeline stages and data-parallel over the rest "
        "(a MoE model's experts split over --ep ranks of the TP x DP grid).",
    )
    p.add_argument("--load", required=True, help="reference checkpoint (run or iteration directory); its own model config is used")
    p.add_argument("--data", required=True, help="dataset prefix written by tools/preprocess_data.py")
    p.add_argument("--output", required=True, help="cache directory to create (set reference.cache_path to it)")
    p.add_argument("--mode", choices=MODES, default="longpo",
                   help="longpo: per-turn responses on the SHORT contexts (default); dpo: responses of the long sequences S_w / S_l")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the reference model")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size of the reference model (a forward-only pipeline schedule)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size of a mixture-of-experts reference model (experts split over --ep "
                        "ranks of the TP x DP grid; --etp x --ep must divide it)")
    p.add_argument("--etp", type=int, default=None, help="tensor-parallel size inside each expert (default: --tp)")
    p.add_argument("--tokens-per-batch", type=int, default=DEFAULT_TOKENS_PER_BATCH,
                   help="padded tokens per forward (rows x padded length); longer sequences run alone")
    p.add_argument("--pad-to-multiple", type=int, default=DEFAULT_PAD_MULTIPLE, help="row length multiple (shape bucketing)")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="override the checkpoint's RoPE base (rare: LongPO's reference keeps the original one)")
    p.add_argument("--params-dtype", choices=["fp32", "bf16"], default=None, help="override the checkpoint's dtype")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    p.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None,
                   help="run the reference forward in the policy's FP8 recipe (Transformer Engine, bf16 checkpoint), so "
                        "the step-0 margin carries no FP8-vs-bf16 offset; default: no FP8")
    p.add_argument("--fp8-recipe", choices=FP8_RECIPES, default="delayed", help="FP8 scaling recipe (with --fp8)")
    p.add_argument("--logprob-chunk-size", type=int, default=DEFAULT_LOGPROB_CHUNK_SIZE, help="positions per chunk of the vocab-parallel log-prob")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --output")
    p.add_argument("--restart", action="store_true", help="discard the partial results of an interrupted run")
    p.add_argument("--no-check-tokenizer", action="store_true",
                   help="skip the check that --data was tokenized like the tokenizer --load ships (training's "
                   "data.check_tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS)  # testing: simulate a kill
    return p
