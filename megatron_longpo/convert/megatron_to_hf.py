"""megatron_longpo checkpoint (saved at any TP) -> HF safetensors directory.

Loads the checkpoint once into fresh TP=1 tensors (one model copy, fc1 kept as its gate/up
halves), cuts them into HF tensors and streams those into safetensors shards, freeing each
conversion unit (embedding, layer, head) once written. Writes config.json (the source HF config with
the checkpoint's ModelConfig applied) and the tokenizer files; the directory appears once complete.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from megatron_longpo.checkpoint import read_meta, resolve_checkpoint_dir
from megatron_longpo.checkpoint import tokenizer_dir as ckpt_tokenizer_dir
from megatron_longpo.checkpoint.model_io import load_sharded
from megatron_longpo.convert import mapping
from megatron_longpo.convert.files import check_output_dir, copy_side_files, staged_dir
from megatron_longpo.convert.hf_config import ConversionError, model_config_to_hf
from megatron_longpo.convert.hf_to_megatron import VerificationError
from megatron_longpo.convert.megatron_model import empty_model, fresh_load_request, row_slice, single_process_runtime
from megatron_longpo.convert.safetensors_io import ShardedSafetensorsWriter, TensorSpec, parse_size
from megatron_longpo.convert.verify import DTYPES, VerifyResult, coarser
from megatron_longpo.convert.verify import verify as run_verify


@dataclass(frozen=True)
class ExportResult:
    out: Path
    num_tensors: int
    seconds: float
    tokenizer_files: list[str]
    verify: Optional[VerifyResult]


def convert_megatron_to_hf(
    megatron_dir: str | Path,
    out: str | Path,
    *,
    dtype: Optional[str] = None,
    tokenizer_dir: Optional[str | Path] = None,
    max_shard_size: str = "5GB",
    verify: bool = False,
    verify_tolerance: float = 1e-3,
    verify_seq_len: int = 64,
    progress: bool = True,
) -> ExportResult:
    """Export checkpoint ``megatron_dir`` (run or iteration dir) as an HF model directory ``out``."""
    start = time.time()
    out = Path(out)
    check_output_dir(out, "--out")
    iter_dir = resolve_checkpoint_dir(megatron_dir)
    meta = read_meta(iter_dir)
    cfg = meta.model
    dtype = dtype or cfg.params_dtype
    if dtype not in ("bf16", "fp32"):
        raise ConversionError(f"--dtype {dtype!r}: choose bf16 or fp32")
    tok_src = Path(tokenizer_dir) if tokenizer_dir else ckpt_tokenizer_dir(megatron_dir)
    if tokenizer_dir and not Path(tokenizer_dir).is_dir():
        raise ConversionError(f"--tokenizer-dir {tokenizer_dir} is not a directory")
    shard_bytes = parse_size(max_shard_size)
    mapping.check_coverage(cfg)

    single_process_runtime()
    hf = mapping.hf_shapes(cfg)
    by_hf: dict[str, list[mapping.Piece]] = defaultdict(list)
    for p in mapping.pieces(cfg):
        by_hf[p.hf].append(p)
    all_units = mapping.units(cfg)
    specs = [TensorSpec(n, hf[n], DTYPES[dtype]) for u in all_units for n in u.hf]

    with staged_dir(out, "--out") as tmp:
        if progress:
            print(f"loading {iter_dir} ...", flush=True)
        # Parameters of the empty model stay untouched; the load fills new tensors.
        # Either layer spec's checkpoint: module _extra_state (TE FP8 metadata) is not exported.
        loaded, absent = load_sharded(fresh_load_request(empty_model(cfg)), iter_dir)
        if absent:
            raise ConversionError(f"{iter_dir} lacks {len(absent)} tensor(s) of the model, e.g. {absent[:4]}")
        writer = ShardedSafetensorsWriter(tmp, specs, shard_bytes)
        try:
            for unit in tqdm(all_units, desc="Megatron -> HF", unit="unit", disable=not progress):
                for name in unit.hf:
                    t = torch.empty(hf[name], dtype=DTYPES[dtype])
                    for p in by_hf[name]:
                        t[p.src[0] : p.src[1]].copy_(row_slice(loaded[p.megatron], p.dst[0], p.dst[1]))
                    writer.write(name, t)
                for m in unit.megatron:
                    del loaded[m]  # free as we go
            writer.close()
        finally:
            writer.abort()
        del loaded
        src = meta.source or {}
        hf_cfg = model_config_to_hf(cfg, src.get("config"), dtype)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        tok_files = copy_side_files(tok_src, tmp) if tok_src is not None else []
        if not tok_files:
            print(f"warning: no tokenizer files found for {megatron_dir}; pass --tokenizer-dir to include them", flush=True)
        result = None
        if verify:
            result = run_verify(
                tmp, iter_dir, cfg, weights_dtype=coarser(cfg.params_dtype, dtype),
                tolerance=verify_tolerance, seq_len=verify_seq_len,
            )
            print(result, flush=True)
            if not result.ok:
                raise VerificationError(f"{result}; the HF directory was not written")
    return ExportResult(out, len(specs), time.time() - start, tok_files, result)
