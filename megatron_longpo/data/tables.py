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


def iter_table_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row as a dict of Python values) of one table file, in order."""
    names, _, batches = open_table(path)
    row = 0
    for batch in batches(names):
        for values in batch.to_pylist():
            yield row, values
            row += 1
