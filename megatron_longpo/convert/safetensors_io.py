"""Streaming safetensors reader / writer for HF checkpoints.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw tensor bytes. Reading and writing it directly (instead of through
``safe_open`` / ``save_file``) lets conversion

- read any row range of a tensor straight into its destination (a slice of a fused QKV or fc1
  parameter) with ``readinto``: no mmap pages held, no per-tensor temporary when dtypes match;
- write each tensor as it is produced, so exporting never holds more than one layer;
- check every shard (present, header readable, long enough) before any expensive work.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Sequence

import torch

from megatron_longpo.convert.hf_config import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: absolute byte range [begin, end) of ``file``."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise ConversionError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e})") from e
    return header, 8 + n


class SafetensorsCheckpoint:
    """All tensors of an HF safetensors checkpoint (``model.safetensors`` or sharded + index).

    The constructor validates every shard: listed files exist, headers parse, each tensor's
    byte range matches its dtype and shape and lies inside the file (catches truncation).
    """

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.entries: dict[str, TensorEntry] = {}
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            others = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(p.name for p in self.dir.glob("*.pt*"))
            hint = f" (found {others[:3]}: convert them to safetensors first, e.g. save_pretrained(safe_serialization=True))" if others else ""
            raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            raise ConversionError(f"{self.dir}: shard(s) {missing} listed in {INDEX_FILE} are missing")
        for fname in files:
            self._add_file(self.dir / fname)
        absent = sorted(n for n, f in weight_map.items() if n not in self.entries or self.entries[n].file.name != f)
        if absent:
            raise ConversionError(f"{index}: tensors {absent[:5]} are not in the shard the index names")
        self._handles: dict[Path, BinaryIO] = {}

    def _add_file(self, path: Path) -> None:
        header, data_start = read_header(path)
        size = path.stat().st_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            if e - b != math.prod(shape) * _itemsize(dtype):
                raise ConversionError(f"{path}: tensor {name} byte range {b}..{e} does not match shape {shape} {info['dtype']}")
            if data_start + e > size:
                raise ConversionError(
                    f"{path}: truncated: tensor {name} ends at byte {data_start + e} but the file has "
                    f"{size} bytes (incomplete download or copy?)"
                )
            if name in self.entries:
                raise ConversionError(f"{path}: tensor {name} also appears in {self.entries[name].file.name}")
            self.entries[name] = TensorEntry(name, path, dtype, shape, data_start + b, data_start + e)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def _file(self, path: Path) -> BinaryIO:
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = open(path, "rb", buffering=0)
        return f

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Copy rows [start, stop) (dim 0) of tensor ``name`` into ``out`` (cast to out.dtype)."""
        e = self.entries[name]
        rows = e.shape[0] if e.shape else 1
        if not (0 <= start <= stop <= rows):
            raise ValueError(f"{name}: rows {start}:{stop} outside 0:{rows}")
        direct = out.dtype == e.dtype and out.is_contiguous()
        buf = out if direct else torch.empty(out.shape, dtype=e.dtype)
        if buf.numel() * _itemsize(e.dtype) != (stop - start) * e.row_bytes:
            raise ValueError(f"{name}: destination {tuple(out.shape)} does not hold rows {start}:{stop} of {e.shape}")
        if buf.numel():
            # A ctypes view of the bytes, not .numpy(): numpy marks the storage non-resizable, and
            # the streaming save frees each storage (resize_(0)) once it is written.
            view = memoryview((ctypes.c_char * buf.nbytes).from_address(buf.data_ptr())).cast("B")
            f = self._file(e.file)
            f.seek(e.begin + start * e.row_bytes)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ConversionError(f"{e.file}: unexpected end of file reading {name}")
                got += n
        if not direct:
            out.copy_(buf)

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=dtype or e.dtype)
        self.read_rows(name, 0, e.shape[0] if e.shape else 1, out)
        return out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class ShardedSafetensorsWriter:
    """Write tensors, in the order of ``specs``, into ``model-0000i-of-0000n.safetensors`` + index.

    Shards are planned up front (greedy, at most ``max_shard_bytes`` each unless one tensor is
    larger), so every header is known before its data and tensors stream straight to disk.
    """

    def __init__(self, out_dir: str | Path, specs: Sequence[TensorSpec], max_shard_bytes: int) -> None:
        self.out = Path(out_dir)
        self.specs = list(specs)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for s in self.specs:
            if shards[-1] and size + s.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(s)
            size += s.nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {s.name: i for i, shard in enumerate(shards) for s in shard}
        self.shards = shards
        self._next = 0
        self._fh: Optional[BinaryIO] = None
        self._left_in_shard = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"unexpected tensor {name}: all {len(self.specs)} tensors were written")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"writer expected {spec.name} {spec.shape} {spec.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._fh is None:
            self._open(self.shard_of[name])
        assert self._fh is not None
        if tensor.numel():
            self._fh.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._fh.close()
            self._fh = None

    def _open(self, i: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for s in self.shards[i]:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
            off += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as the reference writer does
        self._fh = open(self.out / self.files[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._left_in_shard = len(self.shards[i])

    def close(self) -> None:
        """Check that every planned tensor was written and write the index."""
        if self._next != len(self.specs):
            raise ValueError(f"only {self._next} of {len(self.specs)} tensors were written")
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self.specs)},
            "weight_map": {s.name: self.files[self.shard_of[s.name]] for s in self.specs},
        }
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '123' -> bytes."""
    t = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)

