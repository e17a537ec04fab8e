"""HF safetensors checkpoint -> megatron_longpo dist checkpoint (single process, TP=1 layout).

Streams: the Megatron model is built without init only for its sharded state dict, and the save
(:class:`StreamingSaveStrategy`) fills each saved tensor (a layer's QKV, one expert's fc1 gate
half, ...) right before it is written, reading each HF row range straight into its slice (cast
on the fly when dtypes differ), and frees it right after: peak memory is one tensor above the
process's baseline, not the model. Every input check (config, shards, names, shapes) runs
before the first tensor is read; the output directory only appears once complete.
"""

from __future__ import annotations

import gc
import sys
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from megatron_longpo.checkpoint import TOKENIZER_DIR, save_sharded_checkpoint
from megatron_longpo.config import ConfigError, ModelConfig, ParallelConfig, validate_model
from megatron_longpo.convert import mapping
from megatron_longpo.convert.files import check_output_dir, copy_side_files, side_files, staged_dir, tokenizer_files
from megatron_longpo.convert.hf_config import ConversionError, hf_architecture, hf_to_model_config, read_hf_config
from megatron_longpo.convert.megatron_model import (
    SavedTensor,
    StreamingSaveStrategy,
    empty_model,
    return_freed_memory,
    save_request,
    single_process_runtime,
)
from megatron_longpo.convert.safetensors_io import SafetensorsCheckpoint
from megatron_longpo.convert.verify import VerifyResult
from megatron_longpo.convert.verify import verify as run_verify


class VerificationError(RuntimeError):
    """--verify found logits above tolerance; nothing was written."""


@dataclass(frozen=True)
class ImportResult:
    out: Path
    model: ModelConfig
    num_params: int
    seconds: float
    verify: Optional[VerifyResult]


def _is_ignorable(name: str, cfg: ModelConfig) -> bool:
    # Old checkpoints carry the rotary inv_freq buffer; tied models may still store lm_head.
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def check_hf_tensors(reader: SafetensorsCheckpoint, cfg: ModelConfig) -> None:
    """Every tensor the config implies is present with the right shape and a float dtype."""
    expected = mapping.hf_shapes(cfg)
    missing = [n for n in expected if n not in reader]
    if missing:
        raise ConversionError(
            f"{reader.dir}: {len(missing)} tensor(s) that config.json implies are missing from the "
            f"safetensors files, e.g. {missing[:4]}"
        )
    for name, shape in expected.items():
        e = reader.entries[name]
        if e.shape != shape:
            raise ConversionError(
                f"{e.file}: tensor {name} has shape {list(e.shape)} but config.json implies {list(shape)} "
                "(config.json and weights from different models?)"
            )
        if not e.dtype.is_floating_point:
            raise ConversionError(f"{e.file}: tensor {name} has non-float dtype {e.dtype} (quantised checkpoint?)")
    unknown = sorted(n for n in reader.entries if n not in expected and not _is_ignorable(n, cfg))
    if unknown:
        raise ConversionError(
            f"{reader.dir}: {len(unknown)} tensor(s) have no place in a {cfg.arch} model, e.g. {unknown[:4]}"
        )


def check_model(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """The Megatron model has exactly the parameters and shapes of the conversion map."""
    params = dict(model.named_parameters())
    want = mapping.megatron_shapes(cfg)
    if set(params) != set(want) or any(tuple(params[n].shape) != s for n, s in want.items()):
        diff = sorted(set(params) ^ set(want)) or [n for n, s in want.items() if tuple(params[n].shape) != s]
        raise RuntimeError(f"Megatron model parameters do not match the conversion map: {diff[:5]}")


def hf_filler(reader: SafetensorsCheckpoint, cfg: ModelConfig, saved: list[SavedTensor],
              bar: Optional[tqdm] = None) -> Callable[[SavedTensor], None]:
    """Checks that ``saved`` (a save request) tiles every parameter and that each HF row range
    lands inside one saved tensor; returns the function that fills a saved tensor: its HF row
    ranges read in place, vocab padding rows zeroed."""
    want = mapping.megatron_shapes(cfg)
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for st in saved:
        spans[st.param].append((st.start, st.stop))
    by_tensor: dict[tuple[str, int], list[mapping.Piece]] = defaultdict(list)
    for p in mapping.pieces(cfg):
        home = [a for a, b in spans[p.megatron] if a <= p.dst[0] and p.dst[1] <= b]
        if len(home) != 1:
            raise RuntimeError(f"{p.megatron} rows {p.dst} lie in {len(home)} saved tensors {sorted(spans[p.megatron])}")
        by_tensor[(p.megatron, home[0])].append(p)
    for name, rows in want.items():
        if not mapping.tiles(spans[name], rows[0]):
            raise RuntimeError(f"the save request does not tile {name}: {sorted(spans[name])}")

    def fill(st: SavedTensor) -> None:
        with torch.no_grad():
            if st.param in mapping.VOCAB_PARAMS:
                st.tensor[max(cfg.vocab_size - st.start, 0) :].zero_()
            for p in by_tensor[(st.param, st.start)]:
                dst = st.tensor[p.dst[0] - st.start : p.dst[1] - st.start]
                reader.read_rows(p.hf, p.src[0], p.src[1], dst)
                if bar is not None:
                    bar.update((p.src[1] - p.src[0]) * reader.entries[p.hf].row_bytes)

    return fill


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    verify: bool = False,
    verify_tolerance: float = 1e-3,
    verify_seq_len: int = 64,
    progress: bool = True,
    tokenizer: Optional[str | Path] = None,
) -> ImportResult:
    """Convert an HF directory of a supported family (architectures.py) into a checkpoint run directory ``out``.
    ``tokenizer``: a directory to take the tokenizer files from (default: ``hf_dir``)."""
    start = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    tok_src = Path(tokenizer) if tokenizer else hf_dir
    if tokenizer and not tokenizer_files(tok_src):
        raise ConversionError(f"--tokenizer {tok_src}: no tokenizer files there (tokenizer.json, tokenizer.model, "
                              "tokenizer_config.json, vocab.json + merges.txt, ...)")
    if not tokenizer_files(tok_src):
        print(f"warning: {hf_dir} has no tokenizer files (tokenizer.json, tokenizer.model, ...); the checkpoint will "
              "have no tokenizer, which training, evaluation, generation and export need: convert again with "
              "--tokenizer DIR (the directory of the model's tokenizer)", file=sys.stderr, flush=True)
    if dtype not in ("bf16", "fp32"):
        raise ConversionError(f"--dtype {dtype!r}: choose bf16 or fp32")
    check_output_dir(out, "--out")
    hf_cfg = read_hf_config(hf_dir)
    arch = hf_architecture(hf_cfg, str(hf_dir / "config.json"))
    try:
        cfg = hf_to_model_config(hf_cfg, dtype)  # messages start with "config.json: "
    except ConversionError as e:
        raise ConversionError(f"{hf_dir}/{e}") from e
    try:
        validate_model(cfg, ParallelConfig())
    except ConfigError as e:
        raise ConversionError(f"{hf_dir / 'config.json'}: {e}") from e
    mapping.check_coverage(cfg)
    with SafetensorsCheckpoint(hf_dir) as reader:
        check_hf_tensors(reader, cfg)
        extra = _meta_extra(hf_dir, hf_cfg, arch, reader, cfg, tok_src)
        with staged_dir(out, "--out") as tmp:
            return_freed_memory()
            single_process_runtime()
            model = empty_model(cfg)
            num_params = sum(p.numel() for p in model.parameters())
            check_model(model, cfg)
            sharded, saved = save_request(model)
            del model
            total = sum(reader.entries[n].end - reader.entries[n].begin for n in mapping.hf_shapes(cfg))
            with tqdm(total=total, unit="B", unit_scale=True, desc="HF -> Megatron", disable=not progress) as bar:
                fill = hf_filler(reader, cfg, saved, bar)
                save_sharded_checkpoint(tmp, sharded, cfg, iteration=0, extra_meta=extra,
                                        sharded_strategy=StreamingSaveStrategy(saved, fill))
            reader.close()
            del sharded, saved, fill
            gc.collect()
            copy_side_files(hf_dir, tmp / TOKENIZER_DIR)
            if tok_src != hf_dir:
                copy_side_files(tok_src, tmp / TOKENIZER_DIR)
            result = None
            if verify:
                result = run_verify(hf_dir, tmp, cfg, weights_dtype=dtype, tolerance=verify_tolerance, seq_len=verify_seq_len)
                print(result, flush=True)
                if not result.ok:
                    raise VerificationError(f"{result}; the checkpoint was not written")
    return ImportResult(out, cfg, num_params, time.time() - start, result)


def _meta_extra(hf_dir: Path, hf_cfg: dict, arch: str, reader: SafetensorsCheckpoint, cfg: ModelConfig,
                tok_src: Path) -> dict:
    """``source`` and ``tokenizer`` entries of longpo_meta.json (export rebuilds config.json from them)."""
    src_dtype = Counter(reader.entries[n].dtype for n in mapping.hf_shapes(cfg)).most_common(1)[0][0]
    tok_files = sorted({p.name for p in side_files(hf_dir)} | {p.name for p in side_files(tok_src)})
    tokenizer = None
    if tok_files:
        tokenizer = {
            "dir": TOKENIZER_DIR,
            "files": tok_files,
            "tokenizer_class": _read_json(tok_src / "tokenizer_config.json").get("tokenizer_class"),
            "bos_token_id": hf_cfg.get("bos_token_id"),
            "eos_token_id": hf_cfg.get("eos_token_id"),
        }
    source = {
        "format": "hf",
        "architecture": arch,
        "config": hf_cfg,
        "path": str(hf_dir.resolve()),
        "dtype": str(src_dtype).replace("torch.", ""),
    }
    return {"source": source, "tokenizer": tokenizer}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
