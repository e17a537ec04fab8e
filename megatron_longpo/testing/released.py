"""Write preference samples in the authors' released tokenized schema (for tests and examples):
parquet files or a ``datasets.save_to_disk``-style directory, built with pyarrow only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_longpo.data.released import IGNORE_INDEX
from megatron_longpo.data.sample import PreferenceSample


def _padded(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int, left: bool) -> dict:
    n = len(ids)
    pad = [pad_id] * (length - n)
    ids_l = [int(x) for x in ids]
    lab = [int(x) if m else IGNORE_INDEX for x, m in zip(ids, mask)]
    if left:
        return {"input_ids": pad + ids_l, "attention_mask": [0] * (length - n) + [1] * n,
                "labels": [IGNORE_INDEX] * (length - n) + lab}
    return {"input_ids": ids_l + pad, "attention_mask": [1] * n + [0] * (length - n),
            "labels": lab + [IGNORE_INDEX] * (length - n)}


def released_rows(samples: Sequence[PreferenceSample], pad_id: int = 0, left_pad_references: bool = False,
                  with_ids: bool = True) -> list[dict]:
    """One row per sample: S_w and S_l padded to a common length (as the authors pad with unk), one
    padded row per reference turn; labels -100 outside responses."""
    rows = []
    for s in samples:
        L = max(len(s.chosen), len(s.rejected))
        row = {}
        for key, ids, mask in (("chosen", s.chosen, s.chosen_mask), ("rejected", s.rejected, s.rejected_mask)):
            for f, v in _padded(ids, mask, L, pad_id, False).items():
                row[f"{key}_{f}"] = v
        R = max([len(x) for t in s.references for x in (t.chosen, t.rejected)], default=0)
        for key in ("ref_chosen", "ref_rejected"):
            for f in ("input_ids", "attention_mask", "labels"):
                row[f"{key}_{f}"] = []
        for t in s.references:
            for key, ids, mask in (("ref_chosen", t.chosen, t.chosen_mask), ("ref_rejected", t.rejected, t.rejected_mask)):
                for f, v in _padded(ids, mask, R, pad_id, left_pad_references).items():
                    row[f"{key}_{f}"].append(v)
        if with_ids:
            row["prompt_id"] = s.id
        rows.append(row)
    return rows


def _table(rows: list[dict]):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    types = {k: pa.string() if k == "prompt_id" else
             pa.list_(pa.list_(pa.int64())) if k.startswith("ref_") else pa.list_(pa.int64()) for k in cols}
    return pa.table({k: pa.array(v, type=types[k]) for k, v in cols.items()})


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    pq.write_table(_table(rows), str(path), row_group_size=3)
    return Path(path)


def write_save_to_disk(rows: list[dict], directory: str | Path) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes: arrow stream file(s) + state.json."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    table = _table(rows)
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=4)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}], "_split": "train"}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return d
