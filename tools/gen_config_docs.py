"""Regenerate docs/configuration.md from the config dataclasses (their help metadata).

    python tools/gen_config_docs.py            # write
    python tools/gen_config_docs.py --check    # exit 1 if the file is stale (used by the tests)
"""

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from megatron_longpo.config import FLOAT_RANGES, LongPOConfig

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0]) + " or null" if len(args) == 1 else " \\| ".join(map(_type_name, args))
    return getattr(tp, "__name__", str(tp))


def _range(name: str) -> str:
    """`` in (0, 1]`` for a float option with a FLOAT_RANGES entry."""
    if name not in FLOAT_RANGES:
        return ""
    lo, lo_in, hi, hi_in = FLOAT_RANGES[name]
    low, high = "-inf" if lo is None else f"{lo:g}", "inf" if hi is None else f"{hi:g}"
    return f" in {'[' if lo_in else '('}{low}, {high}{']' if hi_in else ')'}"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `megatron_longpo/config.py` by `python tools/gen_config_docs.py`; do not edit by hand.",
        "A run is configured by a YAML file with these sections plus command-line overrides",
        "`--section.key=value` (YAML syntax for the value: `--model.rope_scaling={rope_type: llama3, factor: 8}`).",
        "Every cross-field rule (divisibility by tp / cp, batch sizes, backend / layout combinations) is checked",
        "at start-up by `config.validate`, and files, caches and checkpoints by `training/preflight.py`.",
        "Every float option must be finite (nan / inf are refused) and inside the range its type shows.",
        "",
    ]
    top_hints = typing.get_type_hints(LongPOConfig)
    for section in dataclasses.fields(LongPOConfig):
        cls = top_hints[section.name]
        hints = typing.get_type_hints(cls)
        lines += [f"## `{section.name}`", "", (cls.__doc__ or "").strip(), "",
                  "| option | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            name = f"{section.name}.{f.name}"
            lines.append(f"| `{name}` | {_type_name(hints[f.name])}{_range(name)} | `{default}` | "
                         f"{f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
