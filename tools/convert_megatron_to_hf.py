#!/usr/bin/env python
"""Convert a megatron_longpo checkpoint (saved at any TP) back to an HF safetensors directory.

    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --out HF_DIR [--dtype bf16|fp32] [--verify]

CKPT is a run directory (its latest iteration is used) or one iter_XXXXXXX directory.
Writes safetensors shards + model.safetensors.index.json, config.json and the tokenizer files.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megatron-dir", required=True, help="checkpoint run dir or iteration dir")
    ap.add_argument("--out", required=True, help="HF directory to create (must not exist or be empty)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="HF weight dtype (default: the checkpoint's)")
    ap.add_argument("--tokenizer-dir", default=None, help="tokenizer files to include (default: CKPT/tokenizer)")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    ap.add_argument("--verify", action="store_true", help="compare the written HF model with the checkpoint (fp32 logits)")
    ap.add_argument("--verify-tolerance", type=float, default=1e-3, help="max abs logit difference allowed")
    ap.add_argument("--verify-seq-len", type=int, default=64, help="tokens per sequence for --verify")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    # deferred: --help and option errors answer before torch / megatron-core load
    from megatron_longpo.convert import convert_megatron_to_hf
    from megatron_longpo.convert.cli import run_cli

    return run_cli(
        lambda: convert_megatron_to_hf(
            args.megatron_dir, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
            max_shard_size=args.max_shard_size, verify=args.verify, verify_tolerance=args.verify_tolerance,
            verify_seq_len=args.verify_seq_len, progress=not args.no_progress,
        ),
        lambda res: f"wrote {res.out} ({res.num_tensors} tensors, tokenizer files: {res.tokenizer_files or 'none'}) in {res.seconds:.1f}s",
    )


if __name__ == "__main__":  # guard required: dist_checkpointing's writer re-imports __main__
    sys.exit(main())
