"""Import the authors' released, already tokenized LongPO data into the indexed format.

The LongPO release (DAMO-NLP-SG/*-LongPO-{128K,256K,512K}-tokenized) ships parquet files, also
readable as a ``datasets.save_to_disk`` directory, with one row per sample:

  chosen_input_ids / chosen_attention_mask / chosen_labels        the long multi-turn S_w, padded
  rejected_input_ids / rejected_attention_mask / rejected_labels  S_l
  ref_chosen_{input_ids,attention_mask,labels}                    one padded row per turn: [C_S,i ; I_i ; y_w,i]
  ref_rejected_{...}                                              [C_S,i ; I_i ; y_l,i]

``labels`` are -100 outside the responses and equal ``input_ids`` on them (the HF convention; the
model shifts). Every sequence is taken as the tokens where ``attention_mask`` is 1, its response
mask as ``labels != -100``; the shared prefix P is found from the ids (``split_shared_prefix``), so
both pair layouts work. Rows that cannot be mapped (shifted or foreign labels, prompts that differ,
no response, ids outside the tokenizer) stop the import naming FILE:ROW and the column, or are
dropped and counted with ``--skip-invalid``. Nothing is re-tokenized: the ids are the authors'.

The authors' ``data_prepare/format_tokenize.py`` stores ``chosen_*`` / ``rejected_*`` as a tokenizer
batch of one (a nested ``[[...]]`` per row; read like the flat form) and renders with
``add_generation_prompt=True`` after the final answer, so their labelled spans end with the
template's generation prompt (Qwen2: ``<|im_start|>assistant\n``); ``--trailing-generation-prompt``
keeps it (default, as released) or drops it, counted either way (docs/data.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from megatron_longpo.data.paths import dataset_files, rejected_path
from megatron_longpo.data.preprocess import _fmt_rejected, _stats, _Stats
from megatron_longpo.data.sample import PreferenceSample, ReferenceTurn
from megatron_longpo.data.schema import DataError
from megatron_longpo.data.sequences import split_shared_prefix
from megatron_longpo.data.tables import find_tables, open_table
from megatron_longpo.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
SEQUENCES = ("chosen", "rejected")
REFERENCES = ("ref_chosen", "ref_rejected")
FIELDS = ("input_ids", "attention_mask", "labels")
ID_COLUMNS = ("id", "prompt_id", "sample_id")

# Drop reasons (counted; NAME.rejected.jsonl)
BAD_ROW = "unmappable_row"
TRAILING_CHOICES = ("keep", "drop")


@dataclass
class ImportOptions:
    inputs: list[str]  # parquet files, directories of them, or a datasets.save_to_disk directory
    tokenizer: str
    output_prefix: str
    split: str = "train"  # for a DatasetDict directory
    skip_invalid: bool = False
    overwrite: bool = False
    progress: bool = True
    trailing_generation_prompt: str = "keep"  # keep (as released and trained by the authors) | drop


# ----------------------------------------------------------------------------------------------
# Finding and reading the tables
# ----------------------------------------------------------------------------------------------


def _check_columns(path: Path, names: Sequence[str]) -> tuple[list[str], Optional[str]]:
    need = [f"{s}_{f}" for s in SEQUENCES for f in FIELDS]
    missing = [c for c in need if c not in names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the released LongPO schema has "
            f"{{chosen,rejected,ref_chosen,ref_rejected}}_{{input_ids,attention_mask,labels}} (columns found: {list(names)})"
        )
    refs = [f"{s}_{f}" for s in REFERENCES for f in FIELDS]
    have = [c for c in refs if c in names]
    if have and len(have) != len(refs):
        raise DataError(f"{path}: reference columns {sorted(set(refs) - set(have))} are missing (found {have})")
    id_col = next((c for c in ID_COLUMNS if c in names), None)
    return need + have + ([id_col] if id_col else []), id_col


# ----------------------------------------------------------------------------------------------
# One row -> PreferenceSample
# ----------------------------------------------------------------------------------------------


def _sequence(row: dict, prefix: str, where: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, response mask) of one padded sequence."""
    cols = []
    for f in FIELDS:
        v = np.asarray(row[f"{prefix}_{f}"], dtype=np.int64)
        if v.ndim == 2 and v.shape[0] == 1:  # the authors' tokenizer batch of one, as lists: [[...]]
            v = v[0]
        if v.ndim != 1:
            raise DataError(f"{where}: {prefix}_{f} has shape {list(v.shape)}; expected one sequence per row "
                            "(a flat list, or the nested [[...]] of a batch of one)")
        cols.append(v)
    ids, att, lab = cols
    if not (len(ids) == len(att) == len(lab)):
        raise DataError(f"{where}: {prefix}_input_ids, _attention_mask and _labels have lengths "
                        f"{len(ids)}, {len(att)}, {len(lab)}; they must be equal")
    keep = att == 1
    at = np.nonzero(keep)[0]
    if len(at) and at[-1] - at[0] + 1 != len(at):
        raise DataError(f"{where}: {prefix}_attention_mask has gaps; only left or right padding can be mapped")
    ids, lab = ids[keep], lab[keep]
    mask = lab != IGNORE_INDEX
    if np.any(lab[mask] != ids[mask]):
        at = int(np.nonzero(mask & (lab != ids))[0][0])
        raise DataError(
            f"{where}: {prefix}_labels differ from {prefix}_input_ids at token {at} (label {int(lab[at])}, id "
            f"{int(ids[at])}); expected -100 outside responses and labels == input_ids on them (unshifted)"
        )
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"{where}: {prefix}_input_ids holds id {int(ids.max())} outside the tokenizer's "
                        f"{vocab_size} tokens; --tokenizer must be the one the data was made with")
    return ids, mask.astype(np.uint8)


def generation_prompt_ids(tok: Tokenizer) -> Optional[np.ndarray]:
    """Ids of the text ``apply_chat_template(..., add_generation_prompt=True)`` appends (Qwen2:
    ``<|im_start|>assistant\\n``), or None when the tokenizer's template appends nothing."""
    if tok.kind != "hf" or not tok.chat_template:
        return None
    msgs = [{"role": "user", "content": "x"}]
    try:
        bare = tok._hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        gen = tok._hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses this probe has no generation prompt we can find
        return None
    if not isinstance(gen, str) or not gen.startswith(bare) or gen == bare:
        return None
    return tok.encode(gen[len(bare):])


def _trailing_prompt(ids: np.ndarray, mask: np.ndarray, gen: Optional[np.ndarray]) -> bool:
    """The sequence ends with the generation prompt, labelled (the authors' format_tokenize.py
    renders with add_generation_prompt=True after the final answer)."""
    n = 0 if gen is None else len(gen)
    return 0 < n < len(ids) and bool(np.array_equal(ids[-n:], gen)) and bool(mask[-n:].all())


@dataclass
class TrailingPrompt:
    """What to do with a labelled generation prompt after the last answer, and how often it was met."""

    ids: Optional[np.ndarray]  # generation_prompt_ids of the tokenizer
    drop: bool = False
    sequences: int = 0  # sequences (policy and reference) that ended with it

    def apply(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not _trailing_prompt(ids, mask, self.ids):
            return ids, mask
        self.sequences += 1
        if not self.drop:
            return ids, mask
        n = len(self.ids)
        return ids[:-n], mask[:-n]


def row_to_sample(row: dict, sample_id: str, where: str, vocab_size: int,
                  trailing: Optional[TrailingPrompt] = None) -> PreferenceSample:
    trailing = trailing or TrailingPrompt(None)
    ids_w, m_w = trailing.apply(*_sequence(row, "chosen", where, vocab_size))
    ids_l, m_l = trailing.apply(*_sequence(row, "rejected", where, vocab_size))
    sample = split_shared_prefix(sample_id, ids_w, m_w, ids_l, m_l, where)
    if "ref_chosen_input_ids" in row:
        for s_ in REFERENCES:  # a flat list<int> column is one turn
            for f in FIELDS:
                if isinstance(row[f"{s_}_{f}"], np.ndarray):
                    row[f"{s_}_{f}"] = [row[f"{s_}_{f}"]]
        n_c, n_r = len(row["ref_chosen_input_ids"]), len(row["ref_rejected_input_ids"])
        if n_c != n_r:
            raise DataError(f"{where}: {n_c} ref_chosen rows but {n_r} ref_rejected rows; one per turn in each")
        for k in range(n_c):
            turn = {}
            for s in REFERENCES:
                sub = {f"{s}_{f}": row[f"{s}_{f}"][k] for f in FIELDS}
                ids, mask = trailing.apply(*_sequence(sub, s, f"{where}: turn {k}", vocab_size))
                if not mask.any():
                    raise DataError(f"{where}: turn {k}: {s}_labels mark no response token")
                turn[s] = (ids, mask)
            sample.references.append(ReferenceTurn(*turn["ref_chosen"], *turn["ref_rejected"]))
    sample.check()
    return sample


# ----------------------------------------------------------------------------------------------
# Entry point


# ----------------------------------------------------------------------------------------------


def _column_rows(col) -> list:
    """Per-row values of a pyarrow column: numpy arrays for (nested) integer lists, without a
    Python object per token (a 128K-token row has ~1M ids over its columns)."""
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        inner = col.flatten()
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        if pa.types.is_list(inner.type) or pa.types.is_large_list(inner.type):
            rows = _column_rows(inner)
            return [rows[bounds[i]:bounds[i + 1]] for i in range(len(col))]
        flat = inner.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return [flat[bounds[i]:bounds[i + 1]] for i in range(len(col))]
    return col.to_pylist()


def _rows(tables: list[Path], split_cols: dict) -> Iterator[tuple[str, int, dict]]:
    for path in tables:
        names, _, batches = open_table(path)
        cols, _ = split_cols[path]
        row_no = 0
        for batch in batches(cols):
            values = {name: _column_rows(batch.column(name)) for name in cols}
            for i in range(batch.num_rows):
                yield str(path), row_no, {name: values[name][i] for name in cols}
                row_no += 1


def import_released(o: ImportOptions, log=print) -> dict[str, Any]:
    """Write the released data under ``o.output_prefix``; returns the sidecar."""
    tables = find_tables(o.inputs, o.split)
    existing = [f for f in dataset_files(o.output_prefix) if os.path.exists(f)]
    if existing and not o.overwrite:
        raise DataError(f"--output-prefix {o.output_prefix}: {existing[0]} already exists; pass --overwrite")
    tok = Tokenizer(o.tokenizer)
    if o.trailing_generation_prompt not in TRAILING_CHOICES:
        raise DataError(f"--trailing-generation-prompt {o.trailing_generation_prompt!r}: choose one of "
                        f"{list(TRAILING_CHOICES)}")
    trailing = TrailingPrompt(generation_prompt_ids(tok), drop=o.trailing_generation_prompt == "drop")
    columns, total = {}, 0
    for path in tables:  # every schema is checked before anything is written
        names, n, _ = open_table(path)
        columns[path] = _check_columns(path, names)
        total += n or 0
    # deferred: torch / megatron-core load after the inputs checked
    from megatron_longpo.data.indexed import PreferenceDatasetWriter

    writer = PreferenceDatasetWriter(o.output_prefix, tok.vocab_size)
    rej_tmp = writer.tmp + ".rejected.jsonl"
    stats, seen = _Stats(), {}
    pbar = None
    if o.progress:
        pbar = tqdm(total=total or None, unit="row", desc="import", dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        with open(rej_tmp, "w", encoding="utf-8") as rej:
            for path, row_no, row in _rows(tables, columns):
                stats.records_read += 1
                where = f"{path}:row {row_no}"
                id_col = columns[Path(path)][1]
                sid = str(row[id_col]) if id_col and row.get(id_col) is not None else f"{Path(path).stem}-{row_no}"
                counted = trailing.sequences
                try:
                    if sid in seen:
                        raise DataError(f"{where}: duplicate id {sid!r} (first at {seen[sid]})")
                    sample = row_to_sample(row, sid, where, tok.vocab_size, trailing)
                except DataError as e:
                    trailing.sequences = counted  # a refused row counts nothing
                    if not o.skip_invalid:
                        raise DataError(f"{e}\nNothing was written; fix the data or pass --skip-invalid to drop "
                                        f"such rows (listed in {rejected_path(o.output_prefix)})") from e
                    stats.rejected[BAD_ROW] += 1
                    rej.write(json.dumps({"source": where, "id": sid, "reason": BAD_ROW, "message": str(e)}) + "\n")
                    continue
                seen[sid] = where
                stats.written += 1
                n_turns = sample.num_turns
                if n_turns:
                    stats.longpo += 1
                else:
                    stats.pairs += 1
                    stats.no_short_context += 1
                stats.turns += max(n_turns, 1)
                same = np.array_equal(sample.chosen_branch, sample.rejected_branch)
                stats.identical_records += int(same)
                stats.add_lengths(sample)
                writer.add(sample)
                if pbar is not None:
                    pbar.update(1)
        if pbar is not None:
            pbar.close()
        if stats.written == 0:
            raise DataError(f"no row was imported ({stats.records_read} read; dropped: {_fmt_rejected(dict(stats.rejected))})")
        seconds = time.perf_counter() - t0
        h = hashlib.sha256()
        for path in tables:
            h.update(str(path.resolve()).encode() + b"\0" + str(path.stat().st_size).encode() + b"\n")
        meta = {
            "tokenizer": tok.describe(),
            "template": {"name": "released_tokenized", "fingerprint": h.hexdigest()},
            "options": {"inputs": [str(Path(p).resolve()) for p in o.inputs], "source_format": "released_tokenized",
                        "split": o.split, "skip_invalid": o.skip_invalid, "max_seq_length": None,
                        "overlong": "error", "separator": None, "drop_identical": False,
                        "trailing_generation_prompt": o.trailing_generation_prompt},
            "counts": {**stats.counts(), "trailing_generation_prompt_sequences": trailing.sequences},
            "lengths": {k: _stats(v) for k, v in sorted(stats.len.items())},
            "tokens_per_second": round(stats.tokens_written / max(seconds, 1e-9), 1),
            "workers": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key in ("two_sequences", "shared_prefix", "reference", "prefix"):
            meta["lengths"].setdefault(key, _stats([]))
        meta = writer.commit(meta)
    except BaseException:
        if pbar is not None:
            pbar.close()
        writer.abort()
        if os.path.exists(rej_tmp):
            os.remove(rej_tmp)
        raise
    if stats.rejected:
        os.replace(rej_tmp, rejected_path(o.output_prefix))
    else:
        os.remove(rej_tmp)
        if os.path.exists(rejected_path(o.output_prefix)):
            os.remove(rejected_path(o.output_prefix))
    c, L = meta["counts"], meta["lengths"]
    log(f"import: {c['records_read']} rows read from {len(tables)} file(s), {c['records_written']} written "
        f"({c['longpo_records']} with reference turns, {c['turns_written']} turns) in {seconds:.1f} s\n"
        f"  dropped: {sum(c['rejected'].values())} ({_fmt_rejected(c['rejected'])})\n"
        f"  {trailing.sequences} sequences end with the labelled generation prompt "
        f"{'(dropped from them)' if trailing.drop else '(kept, as released)'}\n"
        f"  pair length two_sequences: max {L['two_sequences']['max']} mean {L['two_sequences']['mean']}; "
        f"shared_prefix: max {L['shared_prefix']['max']}; reference: max {L['reference']['max']}\n"
        f"  output: {o.output_prefix}.{{bin,idx,ids.json,json}}")
    return meta


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="import_released_data.py",
        description="Import the released tokenized LongPO data (parquet files or a datasets.save_to_disk "
        "directory) into megatron_longpo's indexed dataset format (see docs/data.md).",
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="parquet files, directories holding them, or a datasets.save_to_disk directory")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the data was made with (HF directory or .model)")
    p.add_argument("--output-prefix", required=True, help="DIR/NAME: writes NAME.bin/.idx/.ids.json/.json")
    p.add_argument("--split", default="train", help="split of a DatasetDict directory (default: train)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop rows that cannot be mapped (listed in NAME.rejected.jsonl) instead of failing")
    p.add_argument("--trailing-generation-prompt", choices=TRAILING_CHOICES, default="keep",
                   help="a labelled generation prompt after the last answer (the authors' rows end with "
                   "<|im_start|>assistant\\n): keep it as released (default) or drop it; counted either way")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_arg_parser().parse_args(argv)
    try:
        import_released(ImportOptions(a.input, a.tokenizer, a.output_prefix, a.split, a.skip_invalid, a.overwrite,
                                      not a.no_progress, a.trailing_generation_prompt))
    except DataError as e:
        print(f"import_released_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0
