"""Loading Transformer Engine module extra state (FP8 scaling state) from a checkpoint.

TE >= 2.16.1 refuses, in ``set_extra_state``, the pickled delayed-scaling FP8 state its own
``get_extra_state`` writes, unless ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` (gpu_rules.py). A
run resuming its OWN checkpoints (checkpoint.save, written by this trainer and verified against
its manifest) opts in for the duration of that one load; any other checkpoint keeps TE's default.
A refusal becomes one ConfigError line naming the fixes instead of a traceback from deep inside
``load_state_dict``. setup.py pins TE below 2.12, where none of this triggers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from megatron_longpo.config import ConfigError
from megatron_longpo.gpu_rules import TE_PICKLE_ENV, fp8_resume_error, is_te_pickle_refusal
from megatron_longpo.runtime.capabilities import te_version


class FP8StateRefused(ConfigError):
    """Transformer Engine refused the pickled FP8 state of a checkpoint (one-line message)."""


@contextlib.contextmanager
def loading_te_extra_state(where: str, trusted: bool = False) -> Iterator[None]:
    """Around ``model.load_state_dict``: with ``trusted`` let TE unpickle FP8 state for this load
    only (the variable is restored afterwards); a refusal raises :class:`FP8StateRefused`."""
    before = os.environ.get(TE_PICKLE_ENV)
    if trusted:
        os.environ[TE_PICKLE_ENV] = "1"
    try:
        yield
    except RuntimeError as err:
        if is_te_pickle_refusal(err):
            raise FP8StateRefused(fp8_resume_error(where, te_version())) from None
        raise
    finally:
        if before is None:
            os.environ.pop(TE_PICKLE_ENV, None)
        else:
            os.environ[TE_PICKLE_ENV] = before
