"""On-disk preference dataset: Megatron-Core IndexedDataset (.bin/.idx, mmap) + JSON sidecars.

Files of a dataset with prefix ``DIR/NAME``:
  NAME.bin / NAME.idx   megatron.core.datasets.indexed_dataset; one *document* per sample holding
                        the sequences (token dtype = DType.optimal_dtype(vocab_size)):
                          0 prefix                 S_w[:P]
                          1 chosen branch          S_w[P:]
                          2 rejected branch        S_l[P:]
                          3 chosen branch mask     1 on response tokens
                          4 rejected branch mask
                          5 + 4k + (0, 1, 2, 3)    reference turn k: chosen tokens, chosen mask,
                                                   rejected tokens, rejected mask
  NAME.ids.json         JSON list of the sample ids, in dataset order
  NAME.json             sidecar: schema version, tokenizer + template fingerprints, options,
                        counts, length statistics, ids hash, bin hash. Written LAST: a dataset
                        without it is incomplete and refused.
Everything is first written under ``NAME.tmp-*`` names in the same directory and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_longpo.config import ConfigError
from megatron_longpo.data.pair_layout import LAYOUTS, row_length
from megatron_longpo.data.paths import dataset_files, ids_path, prefix_hint, sidecar_path
from megatron_longpo.data.sample import PreferenceSample, ReferenceTurn
from megatron_longpo.data.schema import DataError

FORMAT_NAME = "megatron_longpo.preference_dataset"
SCHEMA_VERSION = 1
FIXED_SEQUENCES = 5  # prefix, chosen branch, rejected branch, their masks
SEQUENCES_PER_TURN = 4  # reference chosen, chosen mask, rejected, rejected mask


def ids_digest(ids: list[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def sample_sequences(sample: PreferenceSample) -> list[np.ndarray]:
    seqs = [sample.prefix, sample.chosen_branch, sample.rejected_branch, sample.chosen_branch_mask,
            sample.rejected_branch_mask]
    for t in sample.references:
        seqs += [t.chosen, t.chosen_mask, t.rejected, t.rejected_mask]
    return seqs


class PreferenceDatasetWriter:
    """Appends samples under a temp prefix; ``commit`` renames into place, ``abort`` cleans up."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tmp = f"{self.prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dtype = DType.optimal_dtype(vocab_size)
        self.builder: Optional[IndexedDatasetBuilder] = IndexedDatasetBuilder(get_bin_path(self.tmp), dtype=self.dtype)
        self.ids: list[str] = []
        self._bin_hash = hashlib.sha256()
        self.tokens_stored = 0

    def add(self, sample: PreferenceSample) -> int:
        seqs = sample_sequences(sample)
        flat = np.concatenate(seqs).astype(self.dtype, copy=False)
        self.builder.add_document(flat, [len(s) for s in seqs])
        self._bin_hash.update(flat.tobytes())
        self.ids.append(sample.id)
        self.tokens_stored += int(flat.size)
        return len(self.ids) - 1

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Finish the files and rename them into place; returns the sidecar written."""
        assert self.builder is not None
        self.builder.finalize(get_idx_path(self.tmp))
        self.builder = None
        meta = dict(meta)
        meta.update(
            format=FORMAT_NAME,
            schema_version=SCHEMA_VERSION,
            num_samples=len(self.ids),
            token_dtype=np.dtype(self.dtype).name,
            tokens_stored=self.tokens_stored,
            ids_sha256=ids_digest(self.ids),
            bin_sha256=self._bin_hash.hexdigest(),
            sequences_per_sample={"fixed": FIXED_SEQUENCES, "per_reference_turn": SEQUENCES_PER_TURN},
        )
        with open(ids_path(self.tmp), "w", encoding="utf-8") as f:
            json.dump(self.ids, f)
        with open(sidecar_path(self.tmp), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # The old sidecar goes first, the new one comes last: at no point does a sidecar sit next to
        # data it does not describe.
        if os.path.exists(sidecar_path(self.prefix)):
            os.remove(sidecar_path(self.prefix))
        for tmp_file, final in zip(dataset_files(self.tmp), dataset_files(self.prefix)):
            os.replace(tmp_file, final)
        return meta

    def abort(self) -> None:
        if self.builder is not None:
            self.builder.data_file.close()
            self.builder = None
        for f in dataset_files(self.tmp):
            if os.path.exists(f):
                os.remove(f)


def load_metadata(prefix: str) -> dict[str, Any]:
    """The sidecar of a complete dataset, or DataError saying what is wrong and how to fix it."""
    side = sidecar_path(prefix)
    rebuild = f"re-run tools/preprocess_data.py --output-prefix {prefix}"
    if not os.path.exists(side):
        if os.path.exists(get_bin_path(prefix)) or os.path.exists(get_idx_path(prefix)):
            raise DataError(f"dataset {prefix} is incomplete ({side} is missing; preprocessing did not finish); {rebuild}")
        hint = prefix_hint(prefix)
        raise DataError(f"dataset {prefix} does not exist (no {side})"
                        + (hint or "; create it with tools/preprocess_data.py"))
    try:
        with open(side, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{side}: not valid JSON ({e}); {rebuild}") from e
    if meta.get("format") != FORMAT_NAME:
        raise DataError(f"{side}: not a megatron_longpo preference dataset (format {meta.get('format')!r})")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise DataError(
            f"{side}: schema version {meta.get('schema_version')} is not the supported {SCHEMA_VERSION}; {rebuild}"
        )
    for f in dataset_files(prefix):
        if not os.path.exists(f):
            raise DataError(f"dataset {prefix}: {f} is missing; {rebuild}")
    return meta


class PreferenceDataset(torch.utils.data.Dataset):
    """Random access to preprocessed samples via mmap; ``dataset[i]`` is a PreferenceSample whose
    arrays are read-only views of the mapped file (copy before writing to them)."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.meta = load_metadata(self.prefix)
        self.indexed = IndexedDataset(self.prefix, mmap=True)
        docs = self.indexed.document_indices
        n = int(self.meta["num_samples"])
        if len(docs) - 1 != n:
            raise DataError(f"dataset {prefix}: index holds {len(docs) - 1} samples, sidecar says {n}; rebuild it")
        with open(ids_path(self.prefix), encoding="utf-8") as f:
            self.ids: list[str] = json.load(f)
        if len(self.ids) != n or ids_digest(self.ids) != self.meta["ids_sha256"]:
            raise DataError(f"dataset {prefix}: {ids_path(self.prefix)} does not match the sidecar; rebuild it")
        self._first = np.asarray(docs[:-1], dtype=np.int64)
        self._count = np.diff(np.asarray(docs, dtype=np.int64))
        lens = np.asarray(self.indexed.sequence_lengths, dtype=np.int64)
        self.prefix_lengths = lens[self._first]  # [N] P
        self.chosen_branch_lengths = lens[self._first + 1]  # [N] Lc
        self.rejected_branch_lengths = lens[self._first + 2]  # [N] Lr
        self.num_turns = (self._count - FIXED_SEQUENCES) // SEQUENCES_PER_TURN  # [N] 0: no reference

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> PreferenceSample:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range (dataset {self.prefix} has {len(self)})")
        first = int(self._first[i])
        s = self.indexed[first : first + int(self._count[i])]
        refs = [ReferenceTurn(*s[k : k + 4]) for k in range(FIXED_SEQUENCES, len(s), SEQUENCES_PER_TURN)]
        return PreferenceSample(
            id=self.ids[i], prefix=s[0], chosen_branch=s[1], rejected_branch=s[2],
            chosen_branch_mask=s[3], rejected_branch_mask=s[4], references=refs, index=i,
        )

    def lengths(self, layout: str) -> np.ndarray:
        """[N] row length of every sample in ``layout`` (before padding)."""
        return row_length(layout, self.prefix_lengths, self.chosen_branch_lengths, self.rejected_branch_lengths)

    @property
    def pad_id(self) -> int:
        return int(self.meta["tokenizer"]["pad_id"])


# ----------------------------------------------------------------------------------------------
# Start-up checks for the trainer / reference precompute (they need only the sidecar)
# ----------------------------------------------------------------------------------------------


def check_dataset_supports_mode(meta: dict[str, Any], reference_mode: Optional[str], option: str = "data.train_data") -> None:
    """A short-context reference (``reference_mode='longpo'``: loss.mode=longpo, precompute
    --mode longpo) needs a short-context reference sequence in every sample; ``dpo`` (long
    context) and None (no reference) need nothing."""
    if reference_mode in ("dpo", None):
        return
    if reference_mode != "longpo":
        raise ConfigError(f"reference mode {reference_mode!r} is not one of ['longpo', 'dpo']")
    missing = int(meta["counts"]["records_without_short_context"])
    if missing:
        raise ConfigError(
            f"{option}: {missing} of {meta['num_samples']} samples are plain pair records without "
            "'short_prompt', so LongPO has no short context for their reference log-probs; use "
            "loss.mode=dpo (reference on the long prompt) or loss.mode=sft, or add 'short_prompt' to the records"
        )


def check_dataset_fits(meta: dict[str, Any], layout: str, max_seq_length: int, option: str = "data.train_data") -> None:
    """Every pair must fit ``data.max_seq_length`` in the chosen layout."""
    stats = meta["lengths"].get(layout)
    if stats is None:
        raise ConfigError(f"data.pair_layout {layout!r} is not one of {list(LAYOUTS)}")
    if stats["max"] > max_seq_length:
        raise ConfigError(
            f"{option}: the longest pair needs {stats['max']} tokens in the {layout} layout, more than "
            f"data.max_seq_length={max_seq_length}; raise data.max_seq_length"
            + (", use data.pair_layout=two_sequences" if layout == "shared_prefix" else "")
            + " or re-run tools/preprocess_data.py with --max-seq-length to drop or truncate long records"
        )


def check_dataset_vocab(meta: dict[str, Any], vocab_size: int, option: str = "data.train_data") -> None:
    """Token ids must be valid rows of the model's embedding."""
    v = int(meta["tokenizer"]["vocab_size"])
    if v > vocab_size:
        raise ConfigError(
            f"{option}: the dataset tokenizer has {v} tokens but model.vocab_size is {vocab_size}; "
            "the data was tokenized for another model"
        )
