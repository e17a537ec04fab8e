#!/usr/bin/env python
"""Convert an HF Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral checkpoint into a megatron_longpo dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out CKPT [--dtype bf16|fp32] [--verify]

Runs as one process on CPU; the result loads at any TP / CP size. See docs/convert.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="parameter dtype of the checkpoint")
    ap.add_argument("--verify", action="store_true", help="compare HF and Megatron logits (fp32) after converting")
    ap.add_argument("--verify-tolerance", type=float, default=1e-3, help="max abs logit difference allowed")
    ap.add_argument("--verify-seq-len", type=int, default=64, help="tokens per sequence for --verify")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="take the tokenizer files from DIR (default: --hf-dir); for an HF directory without them")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    # deferred: --help and option errors answer before torch / megatron-core load
    from megatron_longpo.convert import convert_hf_to_megatron
    from megatron_longpo.convert.cli import run_cli

    return run_cli(
        lambda: convert_hf_to_megatron(
            args.hf_dir, args.out, dtype=args.dtype, verify=args.verify, verify_tolerance=args.verify_tolerance,
            verify_seq_len=args.verify_seq_len, progress=not args.no_progress, tokenizer=args.tokenizer,
        ),
        lambda res: f"wrote {res.out} ({res.model.arch}, {res.num_params / 1e6:.1f}M parameters, {args.dtype}) in {res.seconds:.1f}s",
    )


if __name__ == "__main__":  # guard required: dist_checkpointing's writer re-imports __main__
    sys.exit(main())
