"""Hyper-parameters of a GGUF, checked before llama.cpp sees them.

Some values make llama.cpp abort the whole process (SIGABRT) rather than fail the load: a block count of 0 or over
its layer limit trips an assertion in the loader, a NaN norm epsilon one in the first decode. Reading the metadata
(no tensor is touched) and refusing such values turns that crash into a load error that names the file and the key.

The metadata is walked here rather than with gguf.GGUFReader: the reader builds an object per array element and took
2.8 s on the embedded model's 100k tokenizer entries; this walk skips what it does not check, in well under 0.1 s.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# llama.cpp's LLAMA_MAX_LAYERS (src/llama-hparams.h): more layers overflow its per-layer arrays.
MAX_LAYERS = 512
# No real model comes near these; far larger values only serve to make llama.cpp allocate or loop without end.
MAX_DIM = 1 << 20
MAX_CONTEXT = 1 << 31

# GGUF value types (gguf.GGUFValueType): the struct format of each fixed-size one, little-endian.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_INTS = {0, 1, 2, 3, 4, 5, 10, 11}
_FLOATS = {6, 12}


@dataclass(frozen=True)
class Field:
    """One metadata value: its type (the element type for an array) and, for the kinds checked, its values."""

    type: int
    is_array: bool
    values: list[float | int | bool | str]
    count: int = 1  # an array's length (its values are kept only when it could be a per-layer array)


@dataclass(frozen=True)
class Rule:
    kind: str  # "int" or "float"
    low: float
    high: float
    per_layer: bool = False  # an array of one value per layer is allowed too
    low_open: bool = False  # the low bound itself is not allowed


# Keys under the architecture's prefix (`<arch>.`), with the range llama.cpp can take. Zero is allowed where some
# architecture uses it (Mamba writes 0 heads, for one).
RULES: dict[str, Rule] = {
    "block_count": Rule("int", 1, MAX_LAYERS),
    "context_length": Rule("int", 1, MAX_CONTEXT),
    "embedding_length": Rule("int", 1, MAX_DIM),
    "feed_forward_length": Rule("int", 0, MAX_DIM, per_layer=True),
    "expert_feed_forward_length": Rule("int", 0, MAX_DIM),
    "expert_count": Rule("int", 0, 1 << 16),
    "expert_used_count": Rule("int", 0, 1 << 16),
    "vocab_size": Rule("int", 0, 1 << 26),
    "attention.head_count": Rule("int", 0, 1 << 16, per_layer=True),
    "attention.head_count_kv": Rule("int", 0, 1 << 16, per_layer=True),
    "attention.key_length": Rule("int", 0, MAX_DIM),
    "attention.value_length": Rule("int", 0, MAX_DIM),
    "attention.sliding_window": Rule("int", 0, MAX_CONTEXT),
    "attention.layer_norm_rms_epsilon": Rule("float", 0, 1, low_open=True),
    "attention.layer_norm_epsilon": Rule("float", 0, 1, low_open=True),
    "rope.dimension_count": Rule("int", 0, MAX_DIM),
    "rope.freq_base": Rule("float", 0, 1e12, low_open=True),
    "rope.scaling.factor": Rule("float", 0, 1e6),
    "rope.scaling.original_context_length": Rule("int", 0, MAX_CONTEXT),
}


class HParamError(ValueError):
    """A hyper-parameter llama.cpp cannot take; the message names the key and why."""


def check_hparams(path: Path) -> None:
    """Raise HParamError for a hyper-parameter of `path` that is missing where required, of the wrong type or out of
    range. A file whose metadata cannot be walked is left to llama.cpp, whose loader reports its own reason."""
    fields = read_metadata(path)
    if fields is None:
        return  # a structural corruption: llama.cpp's loader says what is wrong, and fails cleanly
    arch_field = fields.get("general.architecture")
    arch = arch_field.values[0] if arch_field is not None and arch_field.values else None
    if not isinstance(arch, str) or not arch:
        return  # llama.cpp refuses a file without an architecture itself
    if f"{arch}.block_count" not in fields:
        raise HParamError(f"{arch}.block_count is missing")
    block_count: int | None = None
    for suffix, rule in RULES.items():
        key = f"{arch}.{suffix}"
        field = fields.get(key)
        if field is None:
            continue
        values = _values(key, field, rule)
        if field.is_array and block_count is not None and field.count != block_count:
            raise HParamError(f"{key} has {field.count} values; the model has {block_count} layers")
        for value in values:
            _check_range(key, value, rule)
        if suffix == "block_count":
            block_count = int(values[0])
    used, count = fields.get(f"{arch}.expert_used_count"), fields.get(f"{arch}.expert_count")
    if used is not None and count is not None and float(used.values[0]) > float(count.values[0]):
        raise HParamError(f"{arch}.expert_used_count ({used.values[0]}) is over {arch}.expert_count "
                          f"({count.values[0]})")


def read_metadata(path: Path) -> dict[str, Field] | None:
    """The metadata of a GGUF (v2 or v3, little-endian): every key, with the values of scalars and of numeric arrays
    (strings and string arrays are skipped, bar general.architecture). None when the file is not that."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _walk(m)
    except (OSError, ValueError, struct.error, IndexError):
        return None


def _walk(m: mmap.mmap) -> dict[str, Field] | None:
    size = len(m)
    if size < 24 or m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] not in (2, 3):
        return None
    n_kv = struct.unpack_from("<Q", m, 16)[0]
    if n_kv > size:  # each entry takes bytes: a count like this is a corruption
        return None
    pos, fields = 24, {}

    def string(at: int) -> tuple[bytes, int]:
        (n,) = struct.unpack_from("<Q", m, at)
        if at + 8 + n > size:
            raise ValueError("a string runs past the end of the file")
        return m[at + 8: at + 8 + n], at + 8 + n

    for _ in range(n_kv):
        raw_key, pos = string(pos)
        key = raw_key.decode("utf-8", "replace")
        (vtype,) = struct.unpack_from("<I", m, pos)
        pos += 4
        if vtype in _FIXED:
            fmt = "<" + _FIXED[vtype]
            fields[key] = Field(vtype, False, [struct.unpack_from(fmt, m, pos)[0]])
            pos += struct.calcsize(fmt)
        elif vtype == _STRING:
            value, pos = string(pos)
            keep = [value.decode("utf-8", "replace")] if key == "general.architecture" else []
            fields[key] = Field(vtype, False, list(keep))
        elif vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", m, pos)
            pos += 12
            if count > size:
                return None
            if etype in _FIXED:
                fmt = "<" + _FIXED[etype]
                width = struct.calcsize(fmt)
                if pos + width * count > size:
                    return None
                # Only per-layer arrays are checked (at most MAX_LAYERS values): a longer one is skipped unread.
                values = ([v[0] for v in struct.iter_unpack(fmt, m[pos: pos + width * count])]
                          if count <= MAX_LAYERS else [])
                fields[key] = Field(etype, True, list(values), count)
                pos += width * count
            elif etype == _STRING:
                for _ in range(count):
                    _, pos = string(pos)
                fields[key] = Field(etype, True, [], count)
            else:  # nested arrays: llama.cpp has no hyper-parameter of that shape
                return None
        else:
            return None
    return fields


def _values(key: str, field: Field, rule: Rule) -> list[float]:
    expected = _INTS if rule.kind == "int" else _FLOATS
    what = "an integer" if rule.kind == "int" else "a float"
    got = _TYPE_NAMES.get(field.type, str(field.type))
    if field.is_array:
        if not rule.per_layer or field.type not in expected:
            raise HParamError(f"{key} must be {what}, not an array of {got}")
        if field.count == 0:
            raise HParamError(f"{key} is an empty array")
    elif field.type not in expected:
        raise HParamError(f"{key} must be {what}, not {got}")
    return [float(v) for v in field.values]


def _check_range(key: str, value: float, rule: Rule) -> None:
    if not math.isfinite(value):
        raise HParamError(f"{key} is {value}, not a finite number")
    too_low = value <= rule.low if rule.low_open else value < rule.low
    if too_low or value > rule.high:
        low = f"over {rule.low:g}" if rule.low_open else f"at least {rule.low:g}"
        shown = int(value) if rule.kind == "int" else value
        raise HParamError(f"{key} is {shown}; it must be {low} and at most {rule.high:g}")
