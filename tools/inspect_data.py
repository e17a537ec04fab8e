#!/usr/bin/env python
"""Print one preprocessed sample as the model sees it: decoded tokens with the response and NLL
targets marked, or with --json the ids and 0/1 target masks (see docs/data.md).

    python tools/inspect_data.py PREFIX [--index N | --id ID] [--json] [--nll-target sequence|responses]
"""

import sys

from megatron_longpo.data.inspect import main

if __name__ == "__main__":
    sys.exit(main())
