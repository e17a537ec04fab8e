"""Tabular inputs: parquet files, directories of them, and ``datasets.save_to_disk`` directories.

Shared by the released-data import (token-id columns) and preprocessing (text records, one per
row). Tables are read in record batches, so a file need not fit in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_longpo.data.errors import DataError

TABLE_SUFFIXES = (".parquet", ".arrow")


def is_table_input(path: str | Path) -> bool:
    """A parquet/arrow file or a directory (of parquet files, or a save_to_disk dataset)."""
    p = Path(path)
    return p.is_dir() or p.suffix in TABLE_SUFFIXES


def _arrow_files(directory: Path, split: str) -> list[Path]:
    """Arrow files of a ``datasets.save_to_disk`` directory (a Dataset, or a DatasetDict split)."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise DataError(f"--input {directory}: a DatasetDict without split {split!r} (it has {splits}); pass --split")
        directory = directory / split
    state = directory / "state.json"
    if not state.is_file():
        raise DataError(f"--input {directory}: no state.json, so not a datasets.save_to_disk directory")
    files = [directory / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        raise DataError(f"--input {directory}: state.json lists no data files")
    for f in files:
        if not f.is_file():
            raise DataError(f"--input {directory}: {f.name} listed in state.json is missing")
    return files


def find_tables(inputs: Sequence[str], split: str = "train") -> list[Path]:
    """Parquet / arrow files of the inputs, in a stable order."""
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file():
            if p.suffix not in (".parquet", ".arrow"):
                raise DataError(f"--input {p}: expected a .parquet or .arrow file")
            out.append(p)
        elif p.is_dir():
            if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
                out += _arrow_files(p, split)
            else:
                found = sorted(p.rglob("*.parquet"))
                if not found:
                    raise DataError(f"--input {p}: no .parquet files and not a datasets.save_to_disk directory")
                out += found
        else:
            raise DataError(f"--input {p} does not exist")
    return out


def open_table(path: Path):
    """(column names, number of rows or None, iterator of pyarrow RecordBatches)."""
    if path.suffix == ".parquet":
        try:
            f = pq.ParquetFile(path)
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from e
        return f.schema_arrow.names, f.metadata.num_rows, lambda cols: f.iter_batches(batch_size=8, columns=cols)
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema.names, None, lambda cols: (b.select(cols) for b in batches)
    return reader.schema.names, None, lambda cols: (b.select(cols) for b in reader)


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
    ids = np.asarray(row[f"{prefix}_input_ids"], dtype=np.int64)
    att = np.asarray(row[f"{prefix}_attention_mask"], dtype=np.int64)
    lab = np.asarray(row[f"{prefix}_labels"], dtype=np.int64)
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


def row_to_sample(row: dict, sample_id: str, where: str, vocab_size: int) -> PreferenceSample:
    ids_w, m_w = _sequence(row, "chosen", where, vocab_size)
    ids_l, m_l = _sequence(row, "rejected", where, vocab_size)
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
                ids, mask = _sequence(sub, s, f"{where}: turn {k}", vocab_size)
                if not mask.any():
                    raise DataError(f"{where}: turn {k}: {s}_labels mark no response token")
                turn[s] = (ids, mask)
            sample.references.append(ReferenceTurn(*turn["ref_chosen"], *turn["ref_rejected"]))
    sample.check()
    return sample


# ----------------------------------------------------------------------------------------------
# Entry point


def iter_table_rows(path: Path, batch_size: int = 64) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row as a dict of Python values) of one table file, in order."""
    names, _, batches = open_table(path)
    row = 0
    for batch in batches(names):
        for values in batch.to_pylist():
            yield row, values
            row += 1
