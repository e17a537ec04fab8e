"""The prepared GPU check (docs/scaling.md): one JSON report plus a readable summary.

    python tools/gpu_check.py [--smoke] [--out gpu_check.json] [--sections environment,attention,loss,train,te]

Logic: megatron_longpo/checks/gpu_check.py.
"""

import sys

from megatron_longpo.checks.gpu_check import main

# The guard matters: dist_checkpointing / multiprocessing helpers may re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
