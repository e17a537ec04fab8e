"""HF safetensors checkpoint -> megatron_longpo dist checkpoint (single process, TP=1 layout).

Peak memory is about one copy of the model in the target dtype: the Megatron model is built
without init, each HF row range is read straight into its slice of a Megatron parameter (cast on
the fly when dtypes differ), and the save path avoids megatron's clone of the fc1 halves
(:func:`sharded_state_dict_for_save`). Every input check (config, shards, names, shapes) runs
before the first tensor is read; the output directory only appears once complete.
"""

from __future__ import annotations

import gc
import sys
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron_longpo.checkpoint import TOKENIZER_DIR, save_sharded_checkpoint
from megatron_longpo.config import ConfigError, ModelConfig, ParallelConfig, validate_model
from megatron_longpo.convert import mapping
from megatron_longpo.convert.files import check_output_dir, copy_side_files, side_files, staged_dir, tokenizer_files
from megatron_longpo.convert.hf_config import ConversionError, hf_architecture, hf_to_model_config, read_hf_config
from megatron_longpo.convert.megatron_model import empty_model, sharded_state_dict_for_save, single_process_runtime
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


def fill_model(model: torch.nn.Module, reader: SafetensorsCheckpoint, cfg: ModelConfig, progress: bool = True) -> None:
    """Copy every HF row range into its Megatron parameter slice; zero the vocab padding rows."""
    params = dict(model.named_parameters())
    want = mapping.megatron_shapes(cfg)
    if set(params) != set(want) or any(tuple(params[n].shape) != s for n, s in want.items()):
        diff = sorted(set(params) ^ set(want)) or [n for n, s in want.items() if tuple(params[n].shape) != s]
        raise RuntimeError(f"Megatron model parameters do not match the conversion map: {diff[:5]}")
    total = sum(reader.entries[n].end - reader.entries[n].begin for n in mapping.hf_shapes(cfg))
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="HF -> Megatron", disable=not progress) as bar:
        for name in mapping.VOCAB_PARAMS:
            if name in params:
                params[name][cfg.vocab_size :].zero_()
        for p in mapping.pieces(cfg):
            reader.read_rows(p.hf, p.src[0], p.src[1], params[p.megatron][p.dst[0] : p.dst[1]])
            bar.update((p.src[1] - p.src[0]) * reader.entries[p.hf].row_bytes)


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
            single_process_runtime()
            model = empty_model(cfg)
            num_params = sum(p.numel() for p in model.parameters())
            fill_model(model, reader, cfg, progress)
            reader.close()
            sharded = sharded_state_dict_for_save(model)
            del model
            save_sharded_checkpoint(tmp, sharded, cfg, iteration=0, extra_meta=extra)
            del sharded
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
