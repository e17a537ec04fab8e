#!/usr/bin/env python
"""Generate LongPO preference records with the model itself (see docs/generation.md).

    python tools/generate_longpo_data.py --input DOCS... --output OUT.jsonl --model HF_DIR_OR_CKPT \
        [--backend hf|vllm|openai] [--num-shards N --shard-index I | --merge]
"""

import sys

from megatron_longpo.generation.args import build_parser

if __name__ == "__main__":  # guard required: dist_checkpointing's writer re-imports __main__
    build_parser().parse_args()  # --help / option errors answer before torch / transformers load
    from megatron_longpo.generation.cli import main

    sys.exit(main())
