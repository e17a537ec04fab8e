"""An objective scores only the segments its terms need: time and memory of one training step.

    python benchmarks/bench_objective_segments.py [--prefix 16384] [--response 64] [--iters 3]

One preference pair (two_sequences: a ``--prefix``-token document + instruction, then a chosen
and a rejected response of ``--response`` tokens) through the real step,
``training.step.microbatch_forward`` + backward, on a tiny model (2 layers, hidden 64) with a
``--vocab``-sized output layer (default 32000, Mistral's: the per-position log-prob cost is a
[positions, vocab] product, so a toy vocabulary would hide it), for:
- ``dpo nll_weight=0 nll_target=sequence``: no NLL term, so the chosen sequence is not scored
  (before the objective registry it was: every chosen position went through the vocab log-prob);
- ``dpo nll_weight=0 nll_target=responses``: the same objective; must cost the same as above;
- ``dpo nll_weight=1 nll_target=sequence``: the NLL over the whole chosen sequence is a term,
  so every chosen position is scored (what the first row cost before).
Time: all three in one process, one after the other, each the minimum of ``--iters`` steps after
its own warm-up.
Memory: each alone in a fresh process, growth of the peak RSS over two steps (CPU) or
``max_memory_allocated`` above the memory held before (CUDA). CPU runs are single-threaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shared_prefix import make_batch, peak_growth_mib, run_worker  # noqa: E402  (sibling script)

CASES = {
    "w0-sequence": dict(mode="dpo", nll_weight=0.0, nll_target="sequence"),
    "w0-responses": dict(mode="dpo", nll_weight=0.0, nll_target="responses"),
    "w1-sequence": dict(mode="dpo", nll_weight=1.0, nll_target="sequence"),
}


def _setup(args: argparse.Namespace):
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config, tiny_model_config

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    pcfg = parallel_config(attention_backend="sdpa")
    init_distributed(pcfg)
    groups = init_model_parallel(pcfg)
    set_seed(0)
    mcfg = tiny_model_config("llama", max_position_embeddings=args.prefix + 2 * args.response + 128,
                             vocab_size=args.vocab, params_dtype="bf16" if torch.cuda.is_available() else "fp32")
    return mcfg, groups, build_model(mcfg, pcfg)


def _step_fn(model, mcfg, groups, case: str, args: argparse.Namespace):
    from megatron_longpo.config import LossConfig
    from megatron_longpo.training.step import microbatch_forward

    kw = CASES[case]
    batch = make_batch("two_sequences", args.prefix, args.response, mcfg.vocab_size, 64)
    if kw["nll_target"] == "responses":  # the chosen response positions only
        batch.nll_segment = torch.where(batch.response_segment == 0, 0, -1)
    cfg = LossConfig(mode=kw["mode"], nll_weight=kw["nll_weight"], nll_target=kw["nll_target"])
    scored = int(((batch.response_segment >= 0) | ((batch.nll_segment >= 0) & (kw["nll_weight"] > 0))).sum())

    def step() -> None:
        loss, _ = microbatch_forward(model, batch, groups, cfg, mcfg.vocab_size, False)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return step, scored


def worker(args: argparse.Namespace) -> dict:
    mcfg, groups, model = _setup(args)
    cuda = torch.cuda.is_available()
    if args.mode == "memory":
        step, scored = _step_fn(model, mcfg, groups, args.case, args)
        return dict(peak_mib=peak_growth_mib(step), scored=scored)
    best = {c: float("inf") for c in CASES}
    for c in CASES:  # one case at a time after its own warm-up: a large case's freed memory does not
        fn = _step_fn(model, mcfg, groups, c, args)[0]  # bill page faults to the next one
        fn()
        for _ in range(args.iters):
            t0 = time.perf_counter()
            fn()
            best[c] = min(best[c], time.perf_counter() - t0)
    return dict(secs=best, device=torch.cuda.get_device_name() if cuda else "cpu (1 thread)")


def _run(args: argparse.Namespace, mode: str, case: str = "") -> dict:
    return run_worker(__file__, [f"--prefix={args.prefix}", f"--response={args.response}", f"--iters={args.iters}",
                                 f"--vocab={args.vocab}", f"--mode={mode}", f"--case={case}"], f"{mode} {case}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, default=16384)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)  # internal: memory | timing
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    mem = {c: _run(args, "memory", c) for c in CASES}
    tim = _run(args, "timing")
    print(f"device: {tim['device']}; prefix {args.prefix}, responses {args.response} each, vocab {args.vocab}; loss.mode=dpo; "
          f"forward + loss + backward through training.step.microbatch_forward, time = min of {args.iters} steps")
    print(f"{'case':<28}{'scored positions':>17}{'s/step':>9}{'peak MiB':>10}")
    for c, kw in CASES.items():
        name = f"nll_weight={kw['nll_weight']:g} {kw['nll_target']}"
        print(f"{name:<28}{mem[c]['scored']:>17}{tim['secs'][c]:>9.3f}{mem[c]['peak_mib']:>10.1f}")


if __name__ == "__main__":
    main()
