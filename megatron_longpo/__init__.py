"""megatron_longpo: LongPO (short-to-long preference optimization) on Megatron-Core."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, when TE / apex are absent (every CPU run).
# The fallbacks it announces are the intended CPU path (docs/cpu_compat.md); on GPU clusters TE
# is installed and these warnings do not occur.
for _msg in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*"):
    _warnings.filterwarnings("ignore", message=_msg, category=UserWarning)
