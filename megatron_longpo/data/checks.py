"""Start-up checks of a dataset prefix (trainer preflight, reference precompute; before any process group)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megatron_longpo.config import ConfigError
from megatron_longpo.data.indexed import load_metadata
from megatron_longpo.data.schema import DataError
from megatron_longpo.data.tokenizer import Tokenizer, has_tokenizer_files


def check_dataset_files(prefix: str, option: str = "data.train_data") -> dict[str, Any]:
    """The sidecar of the complete dataset at ``prefix``; ConfigError naming ``option`` otherwise
    (missing, incomplete, wrong format or schema version, a data file missing)."""
    try:
        return load_metadata(prefix)
    except DataError as e:
        raise ConfigError(f"{option}={prefix}: {e}") from e


def tokenizer_mismatch(meta: dict[str, Any], data_option: str, prefix: str, ckpt: str, tdir: Path,
                       disable: str) -> Optional[str]:
    """Why the dataset (sidecar ``meta``) cannot be used with the checkpoint ``ckpt``'s shipped
    tokenizer ``tdir``, or None when they agree or the data predates the check (nothing to compare).
    The one rule of the trainer's preflight and the reference precompute; ``disable`` names the
    caller's switch that skips it.

    Refused: a ``tokenizer/`` that holds no tokenizer files (e.g. converted from an HF directory
    without them: it cannot be compared, nor shipped with an export), and a tokenizer that splits
    text differently from the one the data was tokenized with."""
    if not has_tokenizer_files(tdir):
        return (f"checkpoint {ckpt} ships a tokenizer directory {tdir} that does not load (no tokenizer files). Copy "
                f"the model's tokenizer files into {tdir} (or convert again: tools/convert_hf_to_megatron.py "
                f"--tokenizer DIR), or set {disable} to skip comparing it with the data's tokenizer")
    want = meta.get("tokenizer") or {}
    if not want.get("behaviour"):  # preprocessed before the check existed: nothing to compare
        return None
    if Tokenizer(tdir).behaviour_fingerprint() == want["behaviour"]:
        return None
    return (f"{data_option}={prefix} was tokenized with {want.get('path')} but the model checkpoint {ckpt} ships "
            f"the tokenizer {tdir}, which splits text differently: the model would be trained on ids it does not "
            f"read that way (and the export would ship the wrong tokenizer). Re-run tools/preprocess_data.py with "
            f"--tokenizer {tdir}, or set {disable} if you know the two agree")
