"""Exit-code convention shared by the conversion CLIs: 0 ok, 1 verification failed, 2 bad input."""

from __future__ import annotations

import sys
from typing import Any, Callable

from megatron_longpo.checkpoint import CheckpointError
from megatron_longpo.config import ConfigError
from megatron_longpo.convert import ConversionError, VerificationError


def run_cli(convert: Callable[[], Any], describe: Callable[[Any], str]) -> int:
    """Run ``convert()``; print ``describe(result)`` on success or one ``error:`` line on failure."""
    try:
        res = convert()
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # CheckpointError: a checkpoint that cannot be read or written (a full disk mid-save, a source
    # file changed while it was streamed): the path is in the message, a traceback adds nothing.
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(res))
    return 0
