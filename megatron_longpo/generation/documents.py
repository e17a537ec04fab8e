"""Long documents from plain text files, JSONL (a text field) or parquet, in a fixed global order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from megatron_longpo.config import ConfigError

TEXT_SUFFIXES = {".txt", ".md", ".tex", ".text"}


@dataclass(frozen=True)
class Document:
    index: int  # position in the global order (all inputs, in the order given)
    id: str
    text: str
    source: str  # FILE or FILE:LINE / FILE:ROW


def _jsonl(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise ConfigError(f"{where}: expected an object with a string field '{text_field}' (see --text-field)")
            rid = obj.get(id_field)
            yield (str(rid) if rid is not None else f"{path.stem}:{lineno}"), obj[text_field], where


def _parquet(path: Path, text_field: str, id_field: str) -> Iterator[tuple[str, str, str]]:
    try:
        import pyarrow.parquet as pq  # optional: pyarrow (slow to import) is needed by parquet inputs only
    except ImportError as e:
        raise ConfigError(f"{path}: reading parquet needs pyarrow ({e}); pip install pyarrow") from e
    pf = pq.ParquetFile(str(path))
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ConfigError(f"{path}: no column '{text_field}' (columns: {names}); see --text-field")
    cols = [text_field] + ([id_field] if id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols):
        d = batch.to_pydict()
        for i, text in enumerate(d[text_field]):
            rid = d[id_field][i] if id_field in d else None
            yield (str(rid) if rid is not None else f"{path.stem}:{row}"), text or "", f"{path}:{row}"
            row += 1


def iter_documents(paths: Sequence[str | Path], text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Documents of all inputs in order; ids must be unique (a file's stem for plain text)."""
    seen: dict[str, str] = {}
    index = 0
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ConfigError(f"--input {path}: file does not exist")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            items: Iterator[tuple[str, str, str]] = _jsonl(path, text_field, id_field)
        elif suffix == ".parquet":
            items = _parquet(path, text_field, id_field)
        else:
            items = iter([(path.stem, path.read_text(encoding="utf-8"), str(path))])
        for rid, text, where in items:
            if rid in seen:
                raise ConfigError(
                    f"{where}: duplicate document id {rid!r} (first at {seen[rid]}); ids become record ids and "
                    "must be unique (give each document an '{id_field}' field, or rename the file)"
                )
            seen[rid] = where
            yield Document(index, rid, text, where)
            index += 1
