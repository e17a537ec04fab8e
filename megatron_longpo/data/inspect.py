"""One preprocessed sample as the model sees it (tools/inspect_data.py).

``sample_record`` gives the ``--json`` object::

    {"id": ..., "index": ...,
     "policy_chosen":   {"input_ids": [...], "response_mask": [...], "nll_mask": [...]},
     "policy_rejected": {"input_ids": [...], "response_mask": [...], "nll_mask": [...]},
     "reference": [{"chosen": {"input_ids": [...], "response_mask": [...]},
                    "rejected": {"input_ids": [...], "response_mask": [...]}}, ...]}   # one per turn

Masks are 0/1 per position of ``input_ids``; 1 = the token is a target of that term (the
preference log-probs sum over ``response_mask``; the NLL averages over ``nll_mask``, which covers
every token of S_w after the first with ``loss.nll_target=sequence`` and the chosen responses
with ``responses``; S_l has no NLL term). ``render_terminal`` prints the same with the decoded text.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from megatron_longpo.data.sample import PreferenceSample
from megatron_longpo.data.schema import DataError
from megatron_longpo.data.tokenizer import Tokenizer

NLL_TARGETS = ("sequence", "responses")


def nll_mask(ids: np.ndarray, response_mask: np.ndarray, nll_target: str) -> np.ndarray:
    """Targets of the NLL on S_w: every token but the first (it is predicted by nothing), or the
    response tokens."""
    if nll_target == "sequence":
        m = np.ones(len(ids), dtype=np.uint8)
        m[:1] = 0
        return m
    if nll_target == "responses":
        return np.asarray(response_mask, dtype=np.uint8)
    raise DataError(f"--nll-target {nll_target!r} is not one of {list(NLL_TARGETS)}")


def _seq(ids: np.ndarray, mask: np.ndarray, nll: Optional[np.ndarray] = None) -> dict[str, list[int]]:
    out = {"input_ids": [int(x) for x in ids], "response_mask": [int(x) for x in mask]}
    if nll is not None:
        out["nll_mask"] = [int(x) for x in nll]
    return out


def sample_record(s: PreferenceSample, nll_target: str = "sequence") -> dict[str, Any]:
    cw, cm, rw, rm = s.chosen, s.chosen_mask, s.rejected, s.rejected_mask
    return {
        "id": s.id,
        "index": int(s.index),
        "policy_chosen": _seq(cw, cm, nll_mask(cw, cm, nll_target)),
        "policy_rejected": _seq(rw, rm, np.zeros(len(rw), dtype=np.uint8)),
        "reference": [{"chosen": _seq(t.chosen, t.chosen_mask), "rejected": _seq(t.rejected, t.rejected_mask)}
                      for t in s.references],
    }


# ----------------------------------------------------------------------------------------------
# Terminal view
# ----------------------------------------------------------------------------------------------

_STYLE = {"response": ("\x1b[1;32m", "\x1b[0m"), "context": ("\x1b[2m", "\x1b[0m")}
_MARK = {"response": ("⟦", "⟧"), "context": ("", "")}


def _runs(mask: np.ndarray) -> list[tuple[int, int, bool]]:
    """(start, end, value) of the runs of equal mask values."""
    m = np.asarray(mask, dtype=bool)
    if not len(m):
        return []
    cut = np.nonzero(m[1:] != m[:-1])[0] + 1
    edges = [0, *cut.tolist(), len(m)]
    return [(a, b, bool(m[a])) for a, b in zip(edges[:-1], edges[1:])]


def _text(tok: Tokenizer, ids: np.ndarray, max_tokens: int) -> str:
    if max_tokens and len(ids) > max_tokens:
        h = max_tokens // 2
        return f"{tok.decode(ids[:h])} … [{len(ids) - 2 * h} tokens not shown; --full shows all] … {tok.decode(ids[-h:])}"
    return tok.decode(ids)


def render_sequence(title: str, ids: np.ndarray, mask: np.ndarray, tok: Tokenizer, nll: Optional[np.ndarray],
                    color: bool, max_tokens: int) -> str:
    n_resp = int(np.asarray(mask).sum())
    head = f"── {title}: {len(ids)} tokens, {n_resp} response targets"
    if nll is not None:
        head += f", {int(nll.sum())} NLL targets"
    lines = [head]
    style = _STYLE if color else _MARK
    body = []
    for a, b, is_resp in _runs(mask):
        open_, close = style["response" if is_resp else "context"]
        body.append(open_ + _text(tok, ids[a:b], 0 if is_resp else max_tokens) + close)
    lines.append("".join(body))
    return "\n".join(lines)


def render_terminal(s: PreferenceSample, tok: Tokenizer, nll_target: str = "sequence", color: bool = False,
                    max_tokens: int = 400) -> str:
    """Readable view: response targets in bold green (or between ⟦ ⟧ without colour); long
    context runs shortened to their first and last ``max_tokens // 2`` tokens (0: no limit)."""
    cw, cm = s.chosen, s.chosen_mask
    nll = nll_mask(cw, cm, nll_target)
    legend = ("response targets in bold green" if color else "response targets between ⟦ ⟧") + \
        f"; NLL (loss.nll_target={nll_target}): " + \
        ("every token of the chosen sequence after the first" if nll_target == "sequence" else "the chosen responses")
    out = [
        f"sample {s.index} id={s.id!r}: shared prefix P={s.prefix_length}, {s.num_turns} reference turn(s); "
        f"rows: two_sequences {s.two_sequences_length}, shared_prefix {s.shared_prefix_length} tokens",
        f"({legend})",
        render_sequence("policy chosen S_w", cw, cm, tok, nll, color, max_tokens),
        render_sequence("policy rejected S_l", s.rejected, s.rejected_mask, tok, None, color, max_tokens),
    ]
    for k, t in enumerate(s.references):
        out.append(render_sequence(f"reference turn {k + 1} chosen", t.chosen, t.chosen_mask, tok, None, color, max_tokens))
        out.append(render_sequence(f"reference turn {k + 1} rejected", t.rejected, t.rejected_mask, tok, None, color,
                                   max_tokens))
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inspect_data.py",
                                description="Print one preprocessed sample as the model sees it (docs/data.md).")
    p.add_argument("prefix", help="dataset prefix DIR/NAME (tools/preprocess_data.py --output-prefix)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index", type=int, default=None, help="sample position (default 0)")
    g.add_argument("--id", default=None, help="sample id")
    p.add_argument("--json", action="store_true", help="one JSON object (ids and 0/1 target masks) instead of text")
    p.add_argument("--nll-target", choices=NLL_TARGETS, default="sequence", help="as loss.nll_target (default sequence)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to decode with (default: the dataset's, from its sidecar)")
    p.add_argument("--full", action="store_true", help="do not shorten long context runs")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_arg_parser().parse_args(argv)
    try:
        # deferred: torch / megatron-core load after the options parsed
        from megatron_longpo.data.indexed import PreferenceDataset

        ds = PreferenceDataset(a.prefix)
        if a.id is not None:
            try:
                index = ds.ids.index(a.id)
            except ValueError:
                raise DataError(f"dataset {a.prefix} has no sample with id {a.id!r} ({len(ds)} samples)") from None
        else:
            index = 0 if a.index is None else a.index
            if not 0 <= index < len(ds):
                raise DataError(f"--index {index} is out of range: dataset {a.prefix} has {len(ds)} samples (0..{len(ds) - 1})")
        s = ds[index]
        if a.json:
            json.dump(sample_record(s, a.nll_target), sys.stdout)
            sys.stdout.write("\n")
            return 0
        path = a.tokenizer or ds.meta["tokenizer"]["path"]
        try:
            tok = Tokenizer(path)
        except DataError as e:
            raise DataError(f"{e}; pass --tokenizer (the dataset was made with {ds.meta['tokenizer']['path']})") from e
        if tok.fingerprint != ds.meta["tokenizer"]["fingerprint"]:
            print(f"warning: tokenizer {path} is not the one the dataset was made with; the text may be wrong",
                  file=sys.stderr)
        color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty())
        sys.stdout.write(render_terminal(s, tok, a.nll_target, color, 0 if a.full else 400))
    except DataError as e:
        print(f"inspect_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0
