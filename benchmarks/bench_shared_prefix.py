"""shared_prefix vs two_sequences: time and peak memory of one LongPO forward + backward.

    python benchmarks/bench_shared_prefix.py [--prefix 8192] [--response 256] [--iters 2]

A tiny model (2 layers, hidden 64) processes one preference pair whose prompt (the long document
plus instruction) has ``--prefix`` tokens and whose chosen and rejected responses have
``--response`` tokens each, laid out either as two sequences (the prefix twice) or as one
shared-prefix sequence. A step is forward + log-probs + LongPO-style loss + backward.
Peak memory: each layout alone in a fresh process, two steps; on CUDA
``torch.cuda.max_memory_allocated`` above the memory held before the first step, on CPU the growth
of the process's peak resident set size over the same baseline. Time: both layouts in one process,
alternating, after a warm-up; the minimum of ``--iters`` steps each (robust to other load). On the
CPU the runs are single-threaded by default (``--threads``), so that the ratios measure work rather
than thread scheduling on a shared machine.
Runs on the GPU (bf16) when CUDA is available, else on the CPU (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from megatron_longpo.data.pair_layout import LAYOUTS


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def make_batch(layout: str, prefix: int, response: int, vocab: int, multiple: int):
    """One single-turn pair (contract of megatron_longpo/data/batch.py), padded to ``multiple``."""
    from megatron_longpo.data.batch import PairBatch

    g = torch.Generator().manual_seed(0)
    pre = torch.randint(0, vocab, (prefix,), generator=g)
    t0 = torch.randint(0, vocab, (1,), generator=g)
    chosen = torch.cat([t0, torch.randint(0, vocab, (response,), generator=g)])
    rejected = torch.cat([t0, torch.randint(0, vocab, (response,), generator=g)])
    lb = response + 1  # branch length

    def pad(n: int) -> int:
        return -(-n // multiple) * multiple

    if layout == "two_sequences":
        seq = pad(prefix + lb)
        rows = [torch.cat([pre, chosen]), torch.cat([pre, rejected])]
        tokens = torch.zeros(2, seq, dtype=torch.long)
        pos = torch.arange(seq).repeat(2, 1)
        tgt = torch.zeros_like(tokens)
        resp = torch.full_like(tokens, -1)
        nll = torch.full_like(tokens, -1)
        branch_ids = torch.full_like(tokens, -1)
        n = prefix + lb
        for r, row in enumerate(rows):
            tokens[r, :n] = row
            tgt[r, : n - 1] = row[1:]
            resp[r, prefix : n - 1] = r  # targets prefix+1.. are the response
            branch_ids[r, :n] = 0
        nll[0, : n - 1] = 0
    else:
        seq = pad(prefix + 2 * lb)
        tokens = torch.zeros(1, seq, dtype=torch.long)
        tokens[0, : prefix + 2 * lb] = torch.cat([pre, chosen, rejected])
        pos = torch.zeros_like(tokens)
        pos[0, : prefix + lb] = torch.arange(prefix + lb)
        pos[0, prefix + lb : prefix + 2 * lb] = torch.arange(prefix, prefix + lb)
        tgt = torch.zeros_like(tokens)
        tgt[0, : prefix + lb - 1] = torch.cat([pre, chosen])[1:]
        tgt[0, prefix + lb : prefix + 2 * lb - 1] = rejected[1:]
        resp = torch.full_like(tokens, -1)
        resp[0, prefix : prefix + lb - 1] = 0
        resp[0, prefix + lb : prefix + 2 * lb - 1] = 1
        nll = torch.full_like(tokens, -1)
        nll[0, : prefix + lb - 1] = 0
        branch_ids = torch.full_like(tokens, -1)
        branch_ids[0, :prefix] = 0
        branch_ids[0, prefix : prefix + lb] = 1
        branch_ids[0, prefix + lb : prefix + 2 * lb] = 2
    return PairBatch(
        tokens=tokens, position_ids=pos, target_ids=tgt, response_segment=resp, nll_segment=nll,
        branch_ids=branch_ids, num_pairs=1, layout=layout,
        ref_chosen_logps=torch.tensor([-300.0], dtype=torch.float64),
        ref_rejected_logps=torch.tensor([-320.0], dtype=torch.float64),
    )


def _setup(args: argparse.Namespace):
    from megatron_longpo.models.provider import build_model
    from megatron_longpo.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from megatron_longpo.testing.models import parallel_config, tiny_model_config

    cuda = torch.cuda.is_available()
    if not cuda and args.threads > 0:
        torch.set_num_threads(args.threads)
    pcfg = parallel_config(attention_backend="sdpa")
    init_distributed(pcfg)
    groups = init_model_parallel(pcfg)
    set_seed(0)
    total = args.prefix + 2 * (args.response + 1) + 64
    mcfg = tiny_model_config(args.arch, max_position_embeddings=total, params_dtype="bf16" if cuda else "fp32")
    # The project attention runs both layouts, so one model serves both.
    return mcfg, groups, build_model(mcfg, pcfg, pair_layout="shared_prefix")


def _step_fn(model, mcfg, groups, layout: str, args: argparse.Namespace):
    """A closure running forward + per-sequence log-probs + LongPO-style loss + backward."""
    import torch.nn.functional as F

    from megatron_longpo.runtime.capabilities import device

    batch = make_batch(layout, args.prefix, args.response, mcfg.vocab_size, 64).to(device())
    inp = batch.for_cp_rank(groups.cp_rank, groups.cp_size)

    def step() -> None:
        logits = model(inp.tokens, inp.position_ids, inp.attention_mask)[..., : mcfg.vocab_size]
        logp = F.log_softmax(logits.float(), -1).gather(-1, batch.target_ids[..., None]).squeeze(-1)
        seg, nseg = batch.response_segment, batch.nll_segment
        logps = torch.zeros(2, device=logp.device).index_add(0, seg[seg >= 0], logp[seg >= 0])
        nll = -logp[nseg >= 0].mean()
        margin = (logps[0] - batch.ref_chosen_logps[0]) - (logps[1] - batch.ref_rejected_logps[0])
        loss = nll + 0.01 * -F.logsigmoid(0.01 * margin.float())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return step, int(batch.tokens.numel())


def peak_growth_mib(step, steps: int = 2) -> float:
    """Peak memory growth (MiB) over ``steps`` calls of ``step``: CUDA max_memory_allocated above
    the memory held before, else the growth of the process's peak RSS over its current RSS."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now_mib()
    for _ in range(steps):
        step()
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _peak_rss_mib() - base


def memory_worker(args: argparse.Namespace) -> dict:
    """Peak memory growth (MiB) of one layout's step, alone in this fresh process."""
    mcfg, groups, model = _setup(args)
    step, tokens = _step_fn(model, mcfg, groups, args.layout, args)
    return dict(layout=args.layout, tokens=tokens, peak_mib=peak_growth_mib(step))


def timing_worker(args: argparse.Namespace) -> dict:
    """Seconds per step of both layouts, alternating in one process; the minimum over
    ``--iters`` steps resists load from other processes."""
    mcfg, groups, model = _setup(args)
    steps = {lay: _step_fn(model, mcfg, groups, lay, args)[0] for lay in LAYOUTS}
    for fn in steps.values():
        fn()  # warm-up
    best = {lay: float("inf") for lay in LAYOUTS}
    for _ in range(args.iters):
        for lay, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[lay] = min(best[lay], time.perf_counter() - t0)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return dict(secs=best, device=dev)


def run_worker(script: str, flags: list[str], what: str) -> dict:
    """Run ``script flags`` in a fresh process; its last stdout line is a JSON result."""
    out = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(args: argparse.Namespace, mode: str, layout: str = "") -> dict:
    return run_worker(__file__, [f"--prefix={args.prefix}", f"--response={args.response}", f"--iters={args.iters}",
                                 f"--arch={args.arch}", f"--threads={args.threads}", f"--mode={mode}",
                                 f"--layout={layout}"], f"{mode} {layout}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per layout (minimum is reported)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (0: torch default); 1 keeps the ratio about work, not scheduling")
    ap.add_argument("--mode", default="", help=argparse.SUPPRESS)  # internal: memory | timing
    ap.add_argument("--layout", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(memory_worker(args) if args.mode == "memory" else timing_worker(args)))
        return
    mem = {lay: _run(args, "memory", lay) for lay in LAYOUTS}
    tim = _run(args, "timing")
    two, sh = LAYOUTS
    t_ratio = tim["secs"][sh] / tim["secs"][two]
    m_ratio = mem[sh]["peak_mib"] / mem[two]["peak_mib"]
    print(f"device: {tim['device']}; prefix {args.prefix}, responses {args.response} each, "
          f"model {args.arch} tiny, forward+backward, time = min of {args.iters} steps")
    print(f"{'layout':<18}{'tokens':>8}{'s/step':>10}{'peak MiB':>11}")
    for lay in LAYOUTS:
        print(f"{lay:<18}{mem[lay]['tokens']:>8}{tim['secs'][lay]:>10.3f}{mem[lay]['peak_mib']:>11.1f}")
    print(f"{'ratio shared/two':<18}{mem[sh]['tokens'] / mem[two]['tokens']:>8.3f}{t_ratio:>10.3f}{m_ratio:>11.3f}")
    ok = t_ratio <= 0.6 and m_ratio <= 0.6
    print(f"target: time and memory ratios <= 0.6 -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
