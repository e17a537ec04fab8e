"""Chunked vocab-parallel log-probs vs naive full-logits log_softmax: peak memory and time.

    python benchmarks/bench_logprobs.py [--seq 16384 --hidden 512 --vocab 32000 --chunk 1024]

Both variants compute the target log-prob of every position from hidden [seq, hidden] and an
output weight [vocab, hidden] in fp32, then run the backward of sum(coef * logp) (a fixed random
upstream gradient, as the LongPO segment sums give) into the hidden states and the weight.
- naive:   logits = hidden @ W.T; log_softmax(logits).gather(targets)   (autograd keeps [seq, vocab])
- chunked: megatron_longpo.loss.logprobs.vocab_parallel_target_logprobs  (recomputes per chunk)

Peak extra memory: the run is wrapped in torch.profiler with profile_memory=True; every CPU
allocation / free event carries the allocator's running total of allocated bytes. Peak extra =
max(running total) - running total before the run's first allocation, i.e. the highest amount of
memory the run held on top of its inputs (gradients of hidden and W included, in both
variants). This is an allocator-level measurement (tensor bytes), not RSS, so it is not blurred
by malloc caching. Time: wall clock of forward+backward without the profiler, best of --repeats.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from megatron_longpo.loss.logprobs import vocab_parallel_target_logprobs


def naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, chunk: int) -> torch.Tensor:
    logits = hidden @ weight.t()  # [seq, vocab]
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (logp * coef).sum().backward()
    return logp.detach()


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, chunk: int) -> torch.Tensor:
    logp = vocab_parallel_target_logprobs(hidden, weight, targets, vocab_size=weight.shape[0], chunk_size=chunk)
    (logp * coef).sum().backward()
    return logp.detach()


def peak_extra_bytes(fn, *args) -> int:
    """Allocator peak (bytes) of fn(*args) above the memory held when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = []

    def walk(node) -> None:
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        raise RuntimeError("the profiler recorded no allocation: cannot measure memory")
    events.sort()
    baseline = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - baseline


def timed(fn, repeats: int, *args) -> float:
    best = float("inf")
    for _ in range(repeats):
        for t in args[:2]:
            t.grad = None
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunk", type=int, default=1024, help="positions per chunk (loss.logprob_chunk_size)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.seq, args.hidden, generator=g).requires_grad_()
    weight = (0.05 * torch.randn(args.vocab, args.hidden, generator=g)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.seq,), generator=g)
    coef = torch.randn(args.seq, generator=g)
    inputs = (hidden, weight, targets, coef, args.chunk)
    print(f"seq {args.seq}  hidden {args.hidden}  vocab {args.vocab}  chunk {args.chunk}  fp32  "
          f"threads {torch.get_num_threads()}  (one [seq, vocab] fp32 tensor = {args.seq * args.vocab * 4 / 2**30:.2f} GiB)")

    # Agreement first (also warms up both paths).
    lp_n = naive(*inputs)
    gh_n, gw_n = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    lp_c = chunked(*inputs)
    print(f"max |logp diff| {float((lp_n - lp_c).abs().max()):.2e}   max |d hidden diff| "
          f"{float((gh_n - hidden.grad).abs().max()):.2e}   max |d W diff| {float((gw_n - weight.grad).abs().max()):.2e}")
    del gh_n, gw_n

    results = {}
    for name, fn in (("naive", naive), ("chunked", chunked)):
        hidden.grad = weight.grad = None
        mem = peak_extra_bytes(fn, *inputs)
        sec = timed(fn, args.repeats, *inputs)
        results[name] = (mem, sec)
        print(f"{name:8s} peak extra memory {mem / 2**20:10.1f} MiB   fwd+bwd time {sec:8.3f} s")
    (mn, tn), (mc, tc) = results["naive"], results["chunked"]
    mem_ok, time_ok = mc <= mn / 8, tc <= 1.5 * tn
    print(f"ratio chunked/naive: memory {mc / mn:.4f} (target <= 0.125: {'OK' if mem_ok else 'MISSED'})   "
          f"time {tc / tn:.3f} (target <= 1.5: {'OK' if time_ok else 'MISSED'})")


if __name__ == "__main__":
    main()
