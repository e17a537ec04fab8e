"""megatron_longpo checkpoint (saved at any TP) -> HF safetensors directory.

Loads the checkpoint one stacked dist-checkpoint key at a time (e.g. every layer's QKV weight, or
every expert's fc1 of every layer) into fresh TP=1 tensors, fc1 kept as its gate/up halves, cuts
them into HF tensors (zero-copy where an HF tensor is a whole row range in the same dtype),
streams those into safetensors shards and frees the key before loading the next: peak memory is
the largest key, not the model. Writes config.json (the source HF config with the checkpoint's
ModelConfig applied) and the tokenizer files; the directory appears once complete.
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
from megatron_longpo.convert.megatron_model import (
    empty_model,
    fresh_load_request,
    return_freed_memory,
    row_slice,
    single_process_runtime,
)
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

    return_freed_memory()
    single_process_runtime()
    hf = mapping.hf_shapes(cfg)
    by_hf: dict[str, list[mapping.Piece]] = defaultdict(list)
    for p in mapping.pieces(cfg):
        by_hf[p.hf].append(p)
    hf_of: dict[str, list[str]] = defaultdict(list)  # Megatron parameter -> its HF tensors, HF order
    for u in mapping.units(cfg):
        for name in u.hf:
            hf_of[by_hf[name][0].megatron].append(name)  # every HF tensor comes from one parameter
    # Parameters of the empty model stay untouched; each load fills new tensors.
    # Either layer spec's checkpoint: module _extra_state (TE FP8 metadata) is not exported.
    request = fresh_load_request(empty_model(cfg))
    groups = load_groups(request)
    order = [n for g in groups for m in g for n in hf_of[m]]
    if sorted(order) != sorted(hf):
        raise RuntimeError(f"the load request does not cover the HF tensors: {sorted(set(hf) ^ set(order))[:5]}")
    specs = [TensorSpec(n, hf[n], DTYPES[dtype]) for n in order]

    with staged_dir(out, "--out") as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, shard_bytes)
        try:
            for i, group in enumerate(tqdm(groups, desc="Megatron -> HF", unit="key", disable=not progress)):
                # The first load checks every file against the manifest; the rest read verified files.
                loaded, absent = load_sharded({m: request.pop(m) for m in group}, iter_dir,
                                              verify="full" if i == 0 else "none")
                if absent:
                    raise ConversionError(f"{iter_dir} lacks {len(absent)} tensor(s) of the model, e.g. {absent[:4]}")
                for m in group:
                    for name in hf_of[m]:
                        writer.write(name, _hf_tensor(loaded[m], by_hf[name], hf[name], DTYPES[dtype]))
                    del loaded[m]  # free as we go
                del loaded
            writer.close()
        finally:
            writer.abort()
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


def load_groups(request: dict) -> list[list[str]]:
    """Names of ``request`` grouped by dist-checkpoint key, in model order.

    The checkpoint stores each per-layer (per-expert) parameter as one fragment of a stacked
    tensor, and a single-process load must request every fragment of a key at once (megatron's
    conversion to a torch ShardedTensor places them all on the one rank): a key is the smallest
    loadable part.
    """
    groups: dict[str, list[str]] = {}
    for name, item in request.items():
        first = item[0] if isinstance(item, list) else item
        groups.setdefault(first.key, []).append(name)
    return list(groups.values())


def _hf_tensor(value: torch.Tensor | list, pieces: list[mapping.Piece], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """The HF tensor made of ``pieces`` of a loaded parameter: a view of it when it is one row
    range in ``dtype`` (writing it copies nothing), else assembled (QKV) or cast."""
    if len(pieces) == 1:
        p = pieces[0]
        return row_slice(value, p.dst[0], p.dst[1]).to(dtype)
    t = torch.empty(shape, dtype=dtype)
    for p in pieces:
        t[p.src[0] : p.src[1]].copy_(row_slice(value, p.dst[0], p.dst[1]))
    return t
