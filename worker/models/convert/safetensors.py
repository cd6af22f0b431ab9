"""Read SafeTensors checkpoints without torch: memory-mapped, one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw little-endian bytes. Sharded checkpoints list their files in model.safetensors.index.json.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.models.convert.errors import ConvertError

INDEX_FILE = "model.safetensors.index.json"
_ITEM_SIZE = {"BF16": 2, "F16": 2, "F32": 4}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str  # "BF16", "F16" or "F32"
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM_SIZE[self.dtype]


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's .safetensors files: those the index names, else model.safetensors, else all of them."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConvertError(f"{index}: not a valid SafeTensors index ({exc})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{folder}: weights file(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    # Mistral repositories also ship consolidated.safetensors, the same weights under other names.
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("consolidated"))
    if not files:
        raise ConvertError(f"{folder}: no weights: neither {INDEX_FILE} nor any *.safetensors file")
    return files


def read_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ConvertError(f"{path}: not a safetensors file (header length {n})")
        raw = f.read(n)
    if len(raw) < n:
        raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
    try:
        header = json.loads(raw)
    except ValueError:
        raise ConvertError(f"{path}: not a safetensors file (the header is not JSON)") from None
    header.pop("__metadata__", None)
    tensors: dict[str, TensorRef] = {}
    end_of_data = 0
    for name, entry in header.items():
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in _ITEM_SIZE:
            raise ConvertError(f"{path}: tensor {name} has dtype {dtype}; supported: BF16, F16, F32")
        ref = TensorRef(name, path, dtype, shape, 8 + n + begin)
        if end - begin != ref.nbytes:
            raise ConvertError(f"{path}: tensor {name} of shape {list(shape)} {dtype} spans {end - begin} bytes, "
                               f"expected {ref.nbytes}")
        tensors[name] = ref
        end_of_data = max(end_of_data, end)
    if 8 + n + end_of_data > size:
        raise ConvertError(f"{path}: truncated safetensors file: the header promises {8 + n + end_of_data} bytes, "
                           f"the file has {size}")
    return tensors


class Checkpoint:
    """Every tensor of a SafeTensors folder, by name; `load` maps one at a time and widens it to float32."""

    def __init__(self, folder: Path) -> None:
        self.files = weight_files(folder)
        self.tensors: dict[str, TensorRef] = {}
        for path in self.files:
            self.tensors.update(read_header(path))

    def load(self, name: str) -> np.ndarray:
        ref = self.tensors[name]
        if ref.nbytes == 0:
            return np.zeros(ref.shape, dtype=np.float32)
        raw = np.memmap(ref.file, dtype=np.uint8, mode="r", offset=ref.offset, shape=(ref.nbytes,))
        try:
            if ref.dtype == "BF16":  # bf16 is the top half of a float32: widen by shifting into place (in place)
                wide = raw.view("<u2").astype(np.uint32)
                wide <<= 16
                data = wide.view(np.float32)
            else:
                data = raw.view("<f2" if ref.dtype == "F16" else "<f4").astype(np.float32)
        finally:
            del raw  # unmap now: memory stays bounded by the tensor being converted
        return data.reshape(ref.shape)
