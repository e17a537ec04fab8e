#!/usr/bin/env python
"""Tokenize preference records into an indexed binary dataset (see docs/data.md).

    python tools/preprocess_data.py --input FILE.jsonl --tokenizer PATH --output-prefix DIR/NAME \
        --max-seq-length N [--workers K] [--overlong error|drop|truncate_document] [--skip-invalid]
"""

import sys

from megatron_longpo.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
