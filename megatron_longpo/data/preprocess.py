"""JSONL / JSON-array preference records -> indexed binary dataset (tools/preprocess_data.py).

Two passes over the input: the first validates every record (nothing is written when a record is
invalid, unless --skip-invalid), the second tokenizes (optionally in K worker processes, results
consumed in input order, so the output is byte-identical for any K) and writes under temp names
that are renamed at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from megatron_longpo.data.pair_layout import LAYOUTS
from megatron_longpo.data.paths import dataset_files, rejected_path
from megatron_longpo.data.schema import MISSING_FIELD, DataError, InvalidRecord, LongPORecord, PairRecord, read_records
from megatron_longpo.data.sequences import (
    DEFAULT_SEPARATOR,
    OVERLONG_CHOICES,
    OVERLONG_ERROR,
    TEMPLATE_ERROR,
    BuildResult,
    OverlongError,
    build_sample,
)
from megatron_longpo.data.templates import TEMPLATE_CHOICES, ChatTemplate, get_template
from megatron_longpo.data.tokenizer import Tokenizer


@dataclass
class PreprocessOptions:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    max_seq_length: Optional[int] = None  # bound on max(len S_w, len S_l); None: no bound
    overlong: str = "error"  # error | drop | truncate_document
    pair_layout: str = "two_sequences"  # the training layout whose row --max-seq-length bounds
    workers: int = 1
    chat_template: str = "auto"  # auto | tokenizer | mistral | chatml
    skip_invalid: bool = False
    drop_identical: bool = False
    separator: str = DEFAULT_SEPARATOR
    auto_id: bool = False  # records without "id" get their source (FILE:LINE / FILE:row N) as id
    split: str = "train"  # split of a datasets.save_to_disk DatasetDict input
    overwrite: bool = False
    progress: bool = True


@dataclass
class PreprocessResult:
    meta: dict[str, Any]  # the sidecar written
    seconds: float
    summary: str
    rejected: dict[str, int] = field(default_factory=dict)


def _check_options(o: PreprocessOptions) -> None:
    if not o.inputs:
        raise DataError("--input: give at least one JSONL / JSON / parquet file or dataset directory")
    for p in o.inputs:
        if not Path(p).exists():
            raise DataError(f"--input {p}: does not exist")
    if o.max_seq_length is not None and o.max_seq_length <= 0:
        raise DataError(f"--max-seq-length must be > 0 (got {o.max_seq_length})")
    if o.pair_layout not in LAYOUTS:
        raise DataError(f"--pair-layout {o.pair_layout!r} is not one of {list(LAYOUTS)}")
    if o.overlong not in OVERLONG_CHOICES:
        raise DataError(f"--overlong {o.overlong!r} is not one of {list(OVERLONG_CHOICES)}")
    if o.overlong != "error" and o.max_seq_length is None:
        raise DataError(f"--overlong {o.overlong} needs --max-seq-length")
    if o.workers < 1:
        raise DataError(f"--workers must be >= 1 (got {o.workers})")
    if o.chat_template not in TEMPLATE_CHOICES:
        raise DataError(f"--chat-template {o.chat_template!r} is not one of {list(TEMPLATE_CHOICES)}")
    existing = [f for f in dataset_files(o.output_prefix) if os.path.exists(f)]
    if existing and not o.overwrite:
        raise DataError(
            f"--output-prefix {o.output_prefix}: {existing[0]} already exists; pass --overwrite or choose another prefix"
        )
    parent = Path(o.output_prefix).parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise DataError(f"--output-prefix {o.output_prefix}: directory {parent} is not writable")


# ----------------------------------------------------------------------------------------------
# Building (in this process or in workers)
# ----------------------------------------------------------------------------------------------

_STATE: Optional[tuple[Tokenizer, ChatTemplate, dict]] = None


def _init_state(tokenizer_path: str, template_name: str, kwargs: dict) -> None:
    global _STATE
    tok = Tokenizer(tokenizer_path)
    _STATE = (tok, get_template(template_name, tok), kwargs)


def _build(record) -> BuildResult:
    tok, template, kw = _STATE
    skip_invalid = kw["skip_invalid"]
    try:
        return build_sample(
            record, tok, template, max_seq_length=kw["max_seq_length"], overlong=kw["overlong"],
            pair_layout=kw["pair_layout"],
            separator=kw["separator"], drop_identical=kw["drop_identical"],
        )
    except OverlongError as e:  # --overlong error: counted here, reported for every record at the end
        return BuildResult(None, OVERLONG_ERROR, str(e), two_sequences_length=e.length)
    except DataError as e:  # the template cannot render this conversation
        if not skip_invalid:
            raise
        return BuildResult(None, TEMPLATE_ERROR, str(e))


def _ordered_results(items: Iterator, workers: int, init_args: tuple) -> Iterator[tuple[Any, Any, Optional[BuildResult]]]:
    """(record, raw, BuildResult or None for invalid records) in input order, at most 2*workers in flight."""
    if workers == 1:
        _init_state(*init_args)
        for rec, raw in items:
            yield rec, raw, (None if isinstance(rec, InvalidRecord) else _build(rec))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_state, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for rec, raw in items:
            fut = None if isinstance(rec, InvalidRecord) else pool.apply_async(_build, (rec,))
            pending.append((rec, raw, fut))
            while len(pending) > 2 * workers:
                r, w, f = pending.popleft()
                yield r, w, (f.get() if f is not None else None)
        while pending:
            r, w, f = pending.popleft()
            yield r, w, (f.get() if f is not None else None)


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def _stats(values: Sequence[int]) -> dict[str, float]:
    if not len(values):
        return {"count": 0, "min": 0, "max": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "sum": 0}
    a = np.asarray(values, dtype=np.int64)
    return {
        "count": int(a.size), "min": int(a.min()), "max": int(a.max()), "mean": round(float(a.mean()), 2),
        "p50": int(np.percentile(a, 50)), "p90": int(np.percentile(a, 90)), "p99": int(np.percentile(a, 99)),
        "sum": int(a.sum()),
    }


class _Stats:
    def __init__(self) -> None:
        self.records_read = 0
        self.written = 0
        self.longpo = 0
        self.pairs = 0
        self.no_short_context = 0
        self.turns = 0
        self.rejected: collections.Counter = collections.Counter()
        self.truncated_records = 0
        self.truncated_tokens = 0
        self.identical_records = 0
        self.identical_turns = 0
        self.tokens_written = 0
        self.len: dict[str, list[int]] = collections.defaultdict(list)
        self.ignored_keys: collections.Counter = collections.Counter()
        self.unk_id: Optional[int] = None  # the tokenizer's unknown token (text it cannot represent)
        self.unk_tokens = 0
        self.unk_records = 0

    def add(self, record, res: BuildResult) -> None:
        self.ignored_keys.update(record.ignored_keys)
        self.identical_records += int(res.identical)
        self.identical_turns += res.identical_turns
        s = res.sample
        if s is None:
            self.rejected[res.drop_reason] += 1
            return
        self.written += 1
        self.turns += len(record.turns) if isinstance(record, LongPORecord) else 1
        if isinstance(record, PairRecord):
            self.pairs += 1
            self.no_short_context += int(record.short_prompt is None)
        else:
            self.longpo += 1
        if res.truncated_tokens:
            self.truncated_records += 1
            self.truncated_tokens += res.truncated_tokens
        self.add_lengths(s)

    def add_lengths(self, s) -> None:
        refs = [x for x, _ in s.reference_sequences()]
        ref_lens = [len(x) for x in refs]
        if self.unk_id is not None:
            seqs = [s.prefix, s.chosen_branch, s.rejected_branch] + refs
            n = sum(int((np.asarray(x) == self.unk_id).sum()) for x in seqs)
            self.unk_tokens += n
            self.unk_records += int(n > 0)
        self.tokens_written += s.prefix_length + len(s.chosen_branch) + len(s.rejected_branch) + sum(ref_lens)
        self.len["two_sequences"].append(s.two_sequences_length)
        self.len["shared_prefix"].append(s.shared_prefix_length)
        self.len["prefix"].append(s.prefix_length)
        self.len["chosen_branch"].append(len(s.chosen_branch))
        self.len["rejected_branch"].append(len(s.rejected_branch))
        self.len["chosen_response_tokens"].append(int(s.chosen_branch_mask.sum()))
        self.len["rejected_response_tokens"].append(int(s.rejected_branch_mask.sum()))
        self.len["reference"].extend(ref_lens)

    def counts(self) -> dict[str, Any]:
        return {
            "records_read": self.records_read,
            "records_written": self.written,
            "longpo_records": self.longpo,
            "pair_records": self.pairs,
            "records_without_short_context": self.no_short_context,
            "turns_written": self.turns,
            "rejected": dict(sorted(self.rejected.items())),
            "truncated_records": self.truncated_records,
            "truncated_document_tokens": self.truncated_tokens,
            "chosen_equals_rejected_records": self.identical_records,
            "chosen_equals_rejected_turns": self.identical_turns,
            "tokens_written": self.tokens_written,
            "ignored_keys": dict(sorted(self.ignored_keys.items())),
            "unk_tokens": self.unk_tokens,
            "unk_records": self.unk_records,
        }


def _overlong_report(too_long: list[tuple[str, int]], read: int, max_seq_length: Optional[int]) -> str:
    """Every record over the bound at once (not one per run), with the length that would fit them all."""
    longest = max(n for _, n in too_long)
    worst = sorted(too_long, key=lambda x: -x[1])[:5]
    shown = ", ".join(f"{where} ({n} tokens)" for where, n in worst)
    return (f"{len(too_long)} of {read} records need more than --max-seq-length {max_seq_length} tokens "
            f"(longest {longest}): {shown}{' ...' if len(too_long) > 5 else ''}. Nothing "
            f"was written: pass --overlong drop or --overlong truncate_document, or raise --max-seq-length to "
            f">= {longest}")


def _fmt_rejected(c: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"


def _summary(meta: dict, seconds: float, workers: int, prefix: str, had_rejected: bool) -> str:
    c, L = meta["counts"], meta["lengths"]
    lines = [
        f"preprocess: {c['records_read']} records read, {c['records_written']} written "
        f"({c['longpo_records']} LongPO, {c['pair_records']} plain pairs, {c['turns_written']} turns) in {seconds:.1f} s",
        f"  dropped: {sum(c['rejected'].values())} ({_fmt_rejected(c['rejected'])})"
        + (f" -> {rejected_path(prefix)}" if had_rejected else ""),
        f"  truncated documents: {c['truncated_records']} records, {c['truncated_document_tokens']} tokens removed",
        f"  chosen == rejected: {c['chosen_equals_rejected_records']} records, {c['chosen_equals_rejected_turns']} turns"
        + (" (kept; they add nothing to the preference term)" if c["chosen_equals_rejected_records"] and
           not meta["options"]["drop_identical"] else ""),
        f"  tokens: {c['tokens_written']} written ({meta['tokens_per_second']:,.0f} tokens/s while tokenizing, {workers} workers)",
        f"  pair length two_sequences: max {L['two_sequences']['max']} mean {L['two_sequences']['mean']}; "
        f"shared_prefix: max {L['shared_prefix']['max']} mean {L['shared_prefix']['mean']}; "
        f"reference: max {L['reference']['max']}",
    ]
    if c.get("unk_tokens"):
        lines.append(f"  WARNING: {c['unk_tokens']} tokens in {c['unk_records']} records are the tokenizer's unknown "
                     "token (text it cannot represent: wrong tokenizer for this data, or unusual characters)")
    if c.get("ignored_keys"):
        lines.append("  ignored keys (not part of any conversation): "
                     + ", ".join(f"{k} in {n} records" for k, n in c["ignored_keys"].items()))
    if c["records_without_short_context"]:
        lines.append(
            f"  note: {c['records_without_short_context']} pair records have no short_prompt: "
            "train with loss.mode=dpo or sft (not longpo)"
        )
    lines.append(f"  output: {prefix}.{{bin,idx,ids.json,json}}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def template_mismatch(rec: LongPORecord, template: dict[str, str], option: str) -> Optional[str]:
    """Why ``rec`` (generated with the chat template in its ``meta``) must not be built with
    ``template`` (:meth:`ChatTemplate.describe`), or None. A record whose prompts a server rendered
    (fingerprint null) cannot be checked."""
    gen = rec.chat_template
    if gen is None or gen.get("fingerprint") is None or gen.get("fingerprint") == template["fingerprint"]:
        return None
    fix = f"pass --chat-template {gen['name']}" if gen["name"] in TEMPLATE_CHOICES else \
        "pass the --chat-template the data was generated with"
    return (f"{rec.source}: record {rec.id!r} was generated with the chat template {gen['name']!r} (fingerprint "
            f"{str(gen.get('fingerprint'))[:12]}) but {option} renders {template['name']!r} (fingerprint "
            f"{template['fingerprint'][:12]}): the model would be trained in another format than it answered in; "
            f"{fix} (the tokenizer's own template is 'tokenizer')")


def _validate_pass(o: PreprocessOptions, template: Optional[dict[str, str]] = None) -> tuple[int, int]:
    """Pass 1: count records; raise listing the invalid ones unless skip_invalid, and on any record
    generated with another chat template than ``template`` (whatever skip_invalid says)."""
    total, errors, no_id, messages = 0, 0, 0, []
    mismatched, unchecked = [], 0
    records = read_records(o.inputs, o.auto_id, o.split)
    if o.progress:
        records = tqdm(records, unit="rec", desc="validate", dynamic_ncols=True, file=sys.stderr, leave=False)
    for rec, _ in records:
        total += 1
        if isinstance(rec, InvalidRecord):
            errors += 1
            no_id += rec.reason == MISSING_FIELD and ": field 'id' is missing" in rec.message
            if len(messages) < 10:
                messages.append(rec.message)
        elif template is not None and isinstance(rec, LongPORecord) and rec.chat_template is not None:
            why = template_mismatch(rec, template, f"--chat-template {o.chat_template}")
            unchecked += rec.chat_template.get("fingerprint") is None
            if why and len(mismatched) < 10:
                mismatched.append(why)
    if mismatched:
        raise DataError("chat template mismatch; nothing was written:\n  " + "\n  ".join(mismatched))
    if unchecked:
        print(f"preprocess: WARNING: {unchecked} records were generated with prompts rendered by an OpenAI-compatible "
              "server's own chat template (--openai-api chat), which cannot be checked against --chat-template",
              file=sys.stderr)
    if errors and not o.skip_invalid:
        more = f"\n  ... and {errors - len(messages)} more" if errors > len(messages) else ""
        if no_id == errors:  # TRL-style pairs without ids: --skip-invalid would drop every one of them
            fix = ("\nThese records have no 'id' (e.g. TRL-style pairs): pass --auto-id to give each its source "
                   "FILE:LINE as id")
        else:
            fix = (f"\nFix them, or pass --skip-invalid to drop them (they are then written to "
                   f"{rejected_path(o.output_prefix)})")
            if no_id:
                fix += f"; {no_id} of them only lack an 'id': --auto-id gives each its source FILE:LINE as id"
        raise DataError(
            f"{errors} invalid record(s) in the input; nothing was written:\n  " + "\n  ".join(messages) + more + fix
        )
    return total, errors


def preprocess(o: PreprocessOptions, log=print) -> PreprocessResult:
    _check_options(o)
    tok = Tokenizer(o.tokenizer)  # fail fast on a bad tokenizer / template
    template = get_template(o.chat_template, tok)
    t0 = time.perf_counter()
    total, _ = _validate_pass(o, template.describe())
    if not o.progress:
        pbar = None
    else:
        pbar = tqdm(total=total, unit="rec", desc="preprocess", dynamic_ncols=True, file=sys.stderr)
    kwargs = dict(max_seq_length=o.max_seq_length, overlong=o.overlong, pair_layout=o.pair_layout, separator=o.separator,
                  drop_identical=o.drop_identical, skip_invalid=o.skip_invalid)
    # megatron.core (and torch) are imported only once the input is known to be valid.
    # deferred: torch / megatron-core load after the inputs checked
    from megatron_longpo.data.indexed import PreferenceDatasetWriter

    writer = PreferenceDatasetWriter(o.output_prefix, tok.vocab_size)
    rej_final = rejected_path(o.output_prefix)
    rej_tmp = writer.tmp + ".rejected.jsonl"
    stats = _Stats()
    stats.unk_id = tok.unk_id
    t_first: Optional[float] = None
    too_long: list[tuple[str, int]] = []  # (FILE:LINE 'id', tokens) of records over --max-seq-length (--overlong error)
    results = _ordered_results(read_records(o.inputs, o.auto_id, o.split), o.workers, (o.tokenizer, o.chat_template, kwargs))
    try:
        with open(rej_tmp, "w", encoding="utf-8") as rej:
            for rec, raw, res in results:
                if t_first is None:  # tokens/s counts from the first result: not validation, not pool start-up
                    t_first = time.perf_counter()
                stats.records_read += 1
                if res is None:
                    stats.rejected[rec.reason] += 1
                    rej.write(json.dumps({"source": rec.source, "reason": rec.reason, "message": rec.message,
                                          "record": raw}) + "\n")
                elif res.drop_reason == OVERLONG_ERROR:
                    too_long.append((f"{rec.source} {rec.id!r}", res.two_sequences_length))
                else:
                    stats.add(rec, res)
                    if res.sample is not None:
                        writer.add(res.sample)
                    else:
                        rej.write(json.dumps({"source": rec.source, "id": rec.id, "reason": res.drop_reason,
                                              "message": res.message, "record": raw}) + "\n")
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(tok_s=f"{stats.tokens_written / max(time.perf_counter() - t_first, 1e-9):,.0f}",
                                     refresh=False)
        if pbar is not None:
            pbar.close()
        if too_long:
            raise DataError(_overlong_report(too_long, stats.records_read, o.max_seq_length))
        if stats.written == 0:
            raise DataError(
                f"no record was written ({stats.records_read} read; dropped: {_fmt_rejected(dict(stats.rejected))})"
            )
        seconds = time.perf_counter() - t0
        meta = {
            "tokenizer": tok.describe(),
            "template": template.describe(),
            "options": {
                "inputs": [str(Path(p).resolve()) for p in o.inputs], "auto_id": o.auto_id,
                "max_seq_length": o.max_seq_length, "overlong": o.overlong, "pair_layout": o.pair_layout,
                "separator": o.separator,
                "skip_invalid": o.skip_invalid, "drop_identical": o.drop_identical,
            },
            "counts": stats.counts(),
            "lengths": {k: _stats(v) for k, v in sorted(stats.len.items())},
            "tokens_per_second": round(stats.tokens_written / max(time.perf_counter() - (t_first or t0), 1e-9), 1),
            "workers": o.workers,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key in ("two_sequences", "shared_prefix", "reference", "prefix"):
            meta["lengths"].setdefault(key, _stats([]))
        meta = writer.commit(meta)
    except BaseException:
        results.close()  # stops the worker pool
        if pbar is not None:
            pbar.close()
        writer.abort()
        if os.path.exists(rej_tmp):
            os.remove(rej_tmp)
        raise
    had_rejected = bool(stats.rejected)
    if had_rejected:
        os.replace(rej_tmp, rej_final)
    else:
        os.remove(rej_tmp)
        if os.path.exists(rej_final):  # stale, from an earlier run with this prefix
            os.remove(rej_final)
    summary = _summary(meta, seconds, o.workers, o.output_prefix, had_rejected)
    log(summary)
    return PreprocessResult(meta=meta, seconds=seconds, summary=summary, rejected=dict(stats.rejected))


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize LongPO / preference-pair records (JSONL or JSON array) into an indexed "
        "binary dataset for megatron_longpo (see docs/data.md).",
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL or JSON-array file(s), parquet file(s), directories of parquet files, or a "
                        "datasets.save_to_disk directory (one record per row); ids unique over all")
    p.add_argument("--auto-id", action="store_true",
                   help="records without an 'id' (TRL-style files) get their source FILE:LINE / FILE:row N as id")
    p.add_argument("--split", default="train", help="split of a DatasetDict directory (default: train)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--output-prefix", required=True, help="DIR/NAME: writes NAME.bin/.idx/.ids.json/.json")
    p.add_argument("--max-seq-length", type=int, required=True,
                   help="longest allowed max(len chosen sequence, len rejected sequence), in tokens")
    p.add_argument("--overlong", choices=OVERLONG_CHOICES, default="error",
                   help="longer records: fail (default), drop them, or cut the middle of the document")
    p.add_argument("--pair-layout", choices=list(LAYOUTS), default="two_sequences",
                   help="the training layout (data.pair_layout) whose row --max-seq-length bounds; shared_prefix rows "
                        "[document | chosen | rejected] are the longer ones")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output identical for any value)")
    p.add_argument("--chat-template", choices=TEMPLATE_CHOICES, default="auto",
                   help="auto: the tokenizer's own template if it has one, else mistral")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop invalid records (written to NAME.rejected.jsonl with reasons) instead of failing")
    p.add_argument("--drop-identical", action="store_true", help="drop records whose chosen == rejected in every turn")
    p.add_argument("--separator", default=DEFAULT_SEPARATOR,
                   help="text between the document (or short context) and the first instruction (default: blank line)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    opts = PreprocessOptions(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
        max_seq_length=args.max_seq_length, overlong=args.overlong, pair_layout=args.pair_layout, workers=args.workers,
        auto_id=args.auto_id, split=args.split,
        chat_template=args.chat_template, skip_invalid=args.skip_invalid, drop_identical=args.drop_identical,
        separator=args.separator, overwrite=args.overwrite, progress=not args.no_progress,
    )
    try:
        preprocess(opts)
    except DataError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0
