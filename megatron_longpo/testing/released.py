"""Write preference samples in the authors' released tokenized schema (for tests and examples):
parquet files or a ``datasets.save_to_disk``-style directory, built with pyarrow only.

:func:`authors_rows` builds rows from LongPO records with the logic of the authors'
``data_prepare/format_tokenize.py`` (DAMO-NLP-SG/LongPO), step for step: user message = prompt +
"\\n\\n" + question (prompt on the first turn only), ``apply_chat_template(..., tokenize=False,
add_generation_prompt=True)`` after the final answer (so the Qwen2 template adds its default system
prompt and a trailing ``<|im_start|>assistant\\n``), ``tokenizer([text], padding=True)`` turned into
lists (``chosen_*`` / ``rejected_*`` hold a nested [1, L] row), right padding with the pad token for
the per-turn reference rows, and labels found by searching the ids of ``<|im_start|>assistant`` /
``<|im_start|>user`` (``format_labels``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

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
    def kind(v: Any) -> Any:  # list<int> or list<list<int>>, as the first row holds it
        return pa.list_(pa.list_(pa.int64())) if v and isinstance(v[0], list) else pa.list_(pa.int64())

    types = {k: pa.string() if k == "prompt_id" else
             pa.list_(pa.list_(pa.int64())) if k.startswith("ref_") else kind(cols[k][0]) for k in cols}
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


# ----------------------------------------------------------------------------------------------
# The authors' format_tokenize.py logic
# ----------------------------------------------------------------------------------------------


def _format_labels(tok: Any, texts: list[str]) -> dict[str, list]:
    """``format_labels`` of format_tokenize.py on an HF tokenizer (numpy in place of torch)."""
    tok.padding_side = "right"
    batch = tok(texts, padding=True, truncation=False)
    ids = np.asarray(batch["input_ids"], dtype=np.int64)
    labels = ids.copy()
    if tok.pad_token_id is not None:
        labels[labels == tok.pad_token_id] = IGNORE_INDEX
    response = tok.encode("<|im_start|>assistant", add_special_tokens=False)
    instruction = tok.encode("<|im_start|>user", add_special_tokens=False)
    for i in range(len(texts)):
        starts = [int(j) + len(response) for j in np.where(labels[i] == response[0])[0]
                  if labels[i][j: j + len(response)].tolist() == response]
        if not starts:
            labels[i, :] = IGNORE_INDEX
        humans = [int(j) for j in np.where(labels[i] == instruction[0])[0]
                  if labels[i][j: j + len(instruction)].tolist() == instruction]
        if not humans:
            labels[i, :] = IGNORE_INDEX
        if humans and starts and humans[0] > starts[0]:
            humans = [0] + humans
        for k, (a, b) in enumerate(zip(humans, starts)):
            if k:
                labels[i, a:b] = IGNORE_INDEX
            else:
                labels[i, :b] = IGNORE_INDEX
        if len(starts) < len(humans):
            labels[i, humans[-1]:] = IGNORE_INDEX
    return {"input_ids": ids.tolist(), "attention_mask": np.asarray(batch["attention_mask"]).tolist(),
            "labels": labels.tolist()}


def _chat(prompt: str, question: str, answer: str) -> list[dict[str, str]]:
    user = prompt + "\n\n" + question if prompt else question
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def authors_rows(records: Sequence[dict], tokenizer_dir: str | Path, flat: bool = False) -> list[dict]:
    """One released row per LongPO record (the dict form of docs/data.md), made as the authors'
    ``apply_chat_template(task="dpo")`` makes it from prompt / short_prompts / questions / chosens / rejecteds.
    ``flat``: chosen_* / rejected_* as flat lists (a re-saved variant) instead of the nested [1, L]."""
    # deferred: transformers imports torch; the writers above need only pyarrow
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    rows = []
    for r in records:
        long_w: list[dict[str, str]] = []
        long_l: list[dict[str, str]] = []
        short_w, short_l = [], []
        for i, t in enumerate(r["turns"]):
            prompt = r["document"] if i == 0 else ""
            long_w += _chat(prompt, t["instruction"], t["chosen"])
            long_l += _chat(prompt, t["instruction"], t["rejected"])
            short_w.append(_chat(t["short_context"], t["instruction"], t["chosen"]))
            short_l.append(_chat(t["short_context"], t["instruction"], t["rejected"]))

        def render(msgs):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

        row: dict[str, Any] = {}
        for key, batch in (("chosen", _format_labels(tok, [render(long_w)])),
                           ("rejected", _format_labels(tok, [render(long_l)])),
                           ("ref_chosen", _format_labels(tok, [render(m) for m in short_w])),
                           ("ref_rejected", _format_labels(tok, [render(m) for m in short_l]))):
            for f, v in batch.items():
                row[f"{key}_{f}"] = v[0] if flat and not key.startswith("ref_") else v
        row["prompt_id"] = r["id"]
        rows.append(row)
    return rows
