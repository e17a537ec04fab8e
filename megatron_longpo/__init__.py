"""megatron_longpo: LongPO (short-to-long preference optimization) on Megatron-Core."""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import time, once per module, when TE / apex are absent (every CPU run).
# The fallbacks it announces are the intended CPU path (docs/cpu_compat.md); on GPU clusters TE
# is installed and these warnings do not occur.
for _msg in (r".*Transformer Engine and Apex are not installed.*", r".*Apex is not installed.*"):
    _warnings.filterwarnings("ignore", message=_msg, category=UserWarning)

# Warnings no user of this package can act on (each names the upstream cause):
# - megatron-core 0.16.1's TransformerConfig default cuda_graph_scope="full" warns about itself on
#   every model build (we do not use CUDA graphs);
# - dist_checkpointing's torch_dist strategy calls torch's deprecated load_state_dict /
#   ShardedTensor APIs on every save and load;
# - torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor, which megatron-core calls
#   (sequence parallelism, distributed optimizer); the project's own code uses the new names.
for _msg in (r"full scope is deprecated.*", r".*`load_state_dict` is deprecated.*",
             r".*Please use DTensor instead and we are deprecating ShardedTensor.*",
             r".*`torch.distributed.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated.*"):
    _warnings.filterwarnings("ignore", message=_msg)
