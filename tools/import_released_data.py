#!/usr/bin/env python
"""Import the released tokenized LongPO data into an indexed dataset (see docs/data.md).

    python tools/import_released_data.py --input /data/Mistral-7B-LongPO-128K-tokenized \
        --tokenizer /models/Mistral-7B-Instruct-v0.2 --output-prefix data/longpo_128k_released/train
"""

import sys

from megatron_longpo.data.released import main

if __name__ == "__main__":
    sys.exit(main())
