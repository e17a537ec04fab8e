"""Model checkpoints: Megatron dist checkpoint + ``longpo_meta.json``, loadable at any TP / CP.

See :mod:`megatron_longpo.checkpoint.format` for the directory layout.
"""

from megatron_longpo.checkpoint.format import (
    LATEST_FILE,
    META_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    CheckpointMeta,
    iter_dir_name,
    latest_iteration,
    read_meta,
    read_model_config,
    resolve_checkpoint_dir,
    tokenizer_dir,
)
from megatron_longpo.checkpoint.model_io import (
    check_compatible,
    load_model_checkpoint,
    save_model_checkpoint,
    save_sharded_checkpoint,
)

__all__ = [
    "LATEST_FILE", "META_FILE", "TOKENIZER_DIR", "CheckpointError", "CheckpointMeta", "check_compatible",
    "iter_dir_name", "latest_iteration", "load_model_checkpoint", "read_meta", "read_model_config",
    "resolve_checkpoint_dir", "save_model_checkpoint", "save_sharded_checkpoint", "tokenizer_dir",
]
