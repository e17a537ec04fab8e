"""Exit-code convention shared by the conversion CLIs: 0 ok, 1 verification failed, 2 bad input."""

from __future__ import annotations

import sys
from typing import Any, Callable

from megatron_longpo.config import ConfigError
from megatron_longpo.convert import ConversionError, VerificationError


def run_cli(convert: Callable[[], Any], describe: Callable[[Any], str]) -> int:
    """Run ``convert()``; print ``describe(result)`` on success or one ``error:`` line on failure."""
    try:
        res = convert()
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(res))
    return 0
