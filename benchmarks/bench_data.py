#!/usr/bin/env python
"""Data pipeline benchmark (CPU).

1. Preprocess throughput: tokens written per second with 1 and 2 worker processes, on synthetic
   LongPO records with long documents (bundled tiny tokenizer).
2. Random access: median time to fetch one 512K-token pair (S_w and S_l materialised) from the
   mmap'd dataset, against re-reading that record from JSONL and tokenizing it again; prints the
   ratio (target: at least 50x).

    python benchmarks/bench_data.py [--records 24] [--doc-tokens 65536] [--pair-tokens 524288]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"
TOKENS_PER_WORD = 2.4  # bundled tokenizer on synthetic.random_text


def _record(i: int, doc_tokens: int, turns: int = 2) -> dict:
    from megatron_longpo.data.synthetic import random_text

    return {
        "id": f"bench-{i}",
        "document": random_text(int(doc_tokens / TOKENS_PER_WORD), seed=i),
        "turns": [{"short_context": random_text(400, seed=1000 + 10 * i + t),
                   "instruction": f"As described in the preceding text, what happened in part {t}?",
                   "chosen": random_text(60, seed=2000 + 10 * i + t),
                   "rejected": random_text(50, seed=3000 + 10 * i + t)} for t in range(turns)],
    }


def bench_throughput(tmp: Path, records: int, doc_tokens: int) -> dict[int, float]:
    from megatron_longpo.data.preprocess import PreprocessOptions, preprocess

    inp = tmp / "throughput.jsonl"
    with open(inp, "w") as f:
        for i in range(records):
            f.write(json.dumps(_record(i, doc_tokens)) + "\n")
    out = {}
    for workers in (1, 2):
        opts = PreprocessOptions(inputs=[str(inp)], tokenizer=str(TOKENIZER), output_prefix=str(tmp / f"tp{workers}"),
                                 max_seq_length=4 * doc_tokens, workers=workers, progress=False)
        cpu0 = _cpu_seconds()
        res = preprocess(opts, log=lambda s: None)
        cpu = _cpu_seconds() - cpu0
        out[workers] = res.meta["counts"]["tokens_written"] / res.seconds
        print(f"preprocess: {records} records x ~{doc_tokens} doc tokens, workers={workers}: "
              f"{res.meta['counts']['tokens_written']} tokens in {res.seconds:.2f} s = {out[workers]:,.0f} tokens/s "
              f"(CPU {cpu:.2f} s in this process + workers)")
    print(f"preprocess speed-up 2 vs 1 workers: {out[2] / out[1]:.2f}x "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    return out


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_random_access(tmp: Path, pair_tokens: int, fetches: int, rereads: int) -> float:
    from megatron_longpo.data.indexed import PreferenceDataset
    from megatron_longpo.data.preprocess import PreprocessOptions, preprocess
    from megatron_longpo.data.schema import parse_record
    from megatron_longpo.data.sequences import build_sample
    from megatron_longpo.data.templates import get_template
    from megatron_longpo.data.tokenizer import Tokenizer

    inp = tmp / "long.jsonl"
    offsets = []
    with open(inp, "w") as f:
        for i in range(3):  # the long record sits between two shorter ones
            offsets.append(f.tell())
            f.write(json.dumps(_record(i, pair_tokens if i == 1 else 4096)) + "\n")
    opts = PreprocessOptions(inputs=[str(inp)], tokenizer=str(TOKENIZER), output_prefix=str(tmp / "long"),
                             max_seq_length=2 * pair_tokens, progress=False)
    preprocess(opts, log=lambda s: None)
    ds = PreferenceDataset(str(tmp / "long"))
    n_tok = ds[1].two_sequences_length

    def fetch():
        s = ds[1]
        return len(s.chosen) + len(s.rejected)

    times = []
    for _ in range(fetches):
        t0 = time.perf_counter()
        fetch()
        times.append(time.perf_counter() - t0)
    t_mmap = statistics.median(times)

    tok = Tokenizer(TOKENIZER)
    tpl = get_template("auto", tok)

    def reread():
        with open(inp) as f:
            f.seek(offsets[1])
            rec = parse_record(json.loads(f.readline()), f"{inp}:2")
        s = build_sample(rec, tok, tpl).sample
        return len(s.chosen) + len(s.rejected)

    assert reread() == fetch()
    times = []
    for _ in range(rereads):
        t0 = time.perf_counter()
        reread()
        times.append(time.perf_counter() - t0)
    t_json = statistics.median(times)
    ratio = t_json / t_mmap
    print(f"random access of a {n_tok}-token pair (S_w + S_l = {fetch()} tokens): dataset {t_mmap * 1e3:.2f} ms "
          f"(median of {fetches}), JSONL re-read + tokenize {t_json * 1e3:.0f} ms (median of {rereads})")
    print(f"random access speed-up: {ratio:,.0f}x (target >= 50x) -> {'OK' if ratio >= 50 else 'BELOW TARGET'}")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=24)
    ap.add_argument("--doc-tokens", type=int, default=65536)
    ap.add_argument("--pair-tokens", type=int, default=524288)
    ap.add_argument("--fetches", type=int, default=50)
    ap.add_argument("--rereads", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bench_throughput(tmp, args.records, args.doc_tokens)
        ratio = bench_random_access(tmp, args.pair_tokens, args.fetches, args.rereads)
    return 0 if ratio >= 50 else 1


if __name__ == "__main__":
    sys.exit(main())
