#!/usr/bin/env python
"""Benchmark HF <-> Megatron conversion on a synthetic ~1B-parameter model of any family (CPU).

Writes random bf16 HF safetensors shards + config.json directly (no HF model object), then runs
each conversion CLI as a subprocess and reports its wall time and peak RSS divided by the model's
bytes (target: at most 1.5 both ways). Peak RSS is the ru_maxrss that wait4 returns for the
converter (the largest of it and any process it starts). The fixed part of it, the RSS of a
process that only imports the converter (torch + megatron-core), is printed first.

    python benchmarks/bench_convert.py [--layers 18 --hidden 2048 ...] [--workdir DIR] [--no-export]
    python benchmarks/bench_convert.py --arch qwen3_moe --experts 32 --topk 4 --moe-ffn 512 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from megatron_longpo.architectures import ARCH_NAMES, ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic_hf(out: Path, args: argparse.Namespace) -> int:
    """Random HF checkpoint of ``--arch`` (bf16 shards + index + config.json); returns its weight bytes."""
    from megatron_longpo.config import ModelConfig
    from megatron_longpo.convert.hf_config import model_config_to_hf
    from megatron_longpo.convert.mapping import hf_shapes
    from megatron_longpo.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size

    spec = ARCHITECTURES[args.arch]
    moe = dict(num_experts=args.experts, moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn) if spec.moe else {}
    cfg = ModelConfig(
        arch=args.arch, num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
        num_attention_heads=args.heads, num_query_groups=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=4096, rope_theta=500000.0, norm_epsilon=1e-5, params_dtype="bf16",
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_norm, **moe,  # type: ignore[arg-type]
    )
    out.mkdir(parents=True)
    specs = [TensorSpec(n, s, torch.bfloat16) for n, s in hf_shapes(cfg).items()]
    writer = ShardedSafetensorsWriter(out, specs, parse_size(args.shard_size))
    g = torch.Generator().manual_seed(0)
    for s in specs:
        if len(s.shape) == 1:
            t = torch.ones(s.shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(s.shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
        writer.write(s.name, t)
        del t
    writer.close()
    (out / "config.json").write_text(json.dumps(model_config_to_hf(cfg, None, "bf16"), indent=2))
    return sum(s.nbytes for s in specs)


# Started from this (large) process, a command's ru_maxrss would include this process's own RSS:
# Linux carries the memory a child had before exec (fork: the parent's pages; vfork: the parent's
# high-water mark) into the child's ru_maxrss. A small Python process starts the command instead.
_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(st))"
)


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of ``cmd``."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss:
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, rss.name, *cmd], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            print(proc.stdout[-4000:], file=sys.stderr)
        peak_kib = int(rss.read() or 0)
    return wall, peak_kib * 1024, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCH_NAMES, default="llama")
    ap.add_argument("--experts", type=int, default=16, help="MoE families: experts per layer")
    ap.add_argument("--topk", type=int, default=2, help="MoE families: experts per token")
    ap.add_argument("--moe-ffn", type=int, default=1024, help="MoE families: expert intermediate size")
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-size", default="1GB", help="HF shard size of the synthetic input")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--no-export", action="store_true", help="only measure HF -> Megatron")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    py = sys.executable
    try:
        t0 = time.time()
        model_bytes = write_synthetic_hf(work / "hf", args)
        n_params = model_bytes // 2
        print(f"synthetic HF {args.arch}: {n_params / 1e9:.3f}B parameters, {model_bytes / 2**30:.2f} GiB bf16 "
              f"(written in {time.time() - t0:.1f}s)")
        rows = [("HF -> Megatron", [py, "tools/convert_hf_to_megatron.py", "--hf-dir", str(work / "hf"),
                                    "--out", str(work / "megatron"), "--dtype", "bf16", "--no-progress"])]
        if not args.no_export:
            rows.append(("Megatron -> HF", [py, "tools/convert_megatron_to_hf.py", "--megatron-dir",
                                            str(work / "megatron"), "--out", str(work / "hf_back"), "--no-progress"]))
        _, base, _ = run_measured([py, "-c", "import megatron_longpo.convert"])
        print(f"import baseline: peak RSS {base / 2**20:.0f} MiB = {base / model_bytes:.2f} x model bytes "
              f"({model_bytes / 2**20:.0f} MiB)")
        failed = False
        for label, cmd in rows:
            wall, peak, rc = run_measured(cmd)
            failed |= rc != 0
            print(f"{label}: wall {wall:.1f}s, peak RSS {peak / 2**20:.0f} MiB = {peak / model_bytes:.2f} x model bytes"
                  f"{'' if rc == 0 else f'  (FAILED, exit {rc})'}")
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
