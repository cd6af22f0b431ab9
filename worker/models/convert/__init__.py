"""SafeTensors checkpoints → GGUF, without torch, cached: the only per-architecture code of the worker.

`ensure_gguf(folder, cache_dir, quantize)` returns a GGUF converted from the folder, converting (and
quantizing) only when the cache does not hold one for these exact source files and options.
"""

from __future__ import annotations

import time
from pathlib import Path

from worker.models.convert.cache import (
    cache_key,
    clean_stale_temps,
    damage,
    durable_replace,
    forget,
    lock,
    record_check,
    sha256_of,
    temp_path,
)
from worker.models.convert.convert import convert_checkpoint, read_config
from worker.models.convert.errors import ConvertError
from worker.models.convert.families import family_for
from worker.models.convert.quantize import QUANT_TYPES
from worker.models.convert.quantize import quantize as quantize_gguf
from worker.models.convert.safetensors import INDEX_FILE, weight_files
from worker.narration import narrate

__all__ = ["QUANT_TYPES", "ConvertError", "ensure_gguf", "source_files"]

# Besides the weights, the files conversion reads (SpecialVocab reads the chat template files).
_SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
               INDEX_FILE)


def source_files(folder: Path) -> list[Path]:
    """The files a conversion of `folder` reads; missing config, tokenizer or weights are errors."""
    family_for(read_config(folder), where=str(folder / "config.json"))  # fails here, before any hashing
    if not (folder / "tokenizer.json").is_file():
        raise ConvertError(f"{folder}: no tokenizer.json (the GGUF must carry the tokenizer)")
    return [folder / n for n in _SIDE_FILES if (folder / n).is_file()] + weight_files(folder)


def ensure_gguf(folder: Path, cache_dir: Path, quantize: str = "none", label: str | None = None) -> Path:
    if quantize != "none" and quantize not in QUANT_TYPES:
        raise ConvertError(f"unknown quantization {quantize!r}; supported: none, {', '.join(QUANT_TYPES)}")
    label = label or folder.name
    files = source_files(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for tmp in clean_stale_temps(cache_dir):
        narrate("convert_cache_cleaned", f"Removed {tmp}, left by a conversion that did not finish.",
                target=label, path=str(tmp))
    key = cache_key(files, {"quantize": quantize}, cache_dir)
    out = cache_dir / f"{_safe(label)}-{key[:16]}.{'f16' if quantize == 'none' else quantize}.gguf"
    with lock(out):  # also while checking: a conversion may be writing the record right now
        if out.is_file():  # converted before (or by another worker while this one waited for the lock)
            reason = damage(out)
            if reason is None:
                narrate("safetensors_convert_cached", f"{label} was converted before: {out}.", target=label,
                        path=str(out))
                return out
            narrate("convert_cache_damaged", f"The cached {out} cannot be used ({reason}): converting again.",
                    level="warning", target=label, path=str(out), reason=reason)
            forget(out)
        source_bytes = sum(f.stat().st_size for f in files)
        narrate("safetensors_convert_start", f"Converting {label} ({_size(source_bytes)} of SafeTensors) to "
                f"GGUF ({'F16' if quantize == 'none' else quantize}).", target=label, source=str(folder),
                source_bytes=source_bytes, quantize=quantize)
        t0 = time.perf_counter()
        with temp_path(out) as tmp, temp_path(out, ".f16") as f16:
            stats = convert_checkpoint(folder, f16 if quantize != "none" else tmp, name=label)
            if quantize != "none":
                quantize_gguf(f16, tmp, quantize)
            digest = sha256_of(tmp)
            durable_replace(tmp, out)
            record_check(out, digest)
        seconds = time.perf_counter() - t0
        size = out.stat().st_size
        narrate("safetensors_convert_complete", f"Converted {label} ({stats.architecture}, {stats.n_tensors} "
                f"tensors) in {seconds:.1f} s: {_size(size)} of GGUF at {out}.", target=label, path=str(out),
                architecture=stats.architecture, source_bytes=source_bytes, output_bytes=size,
                duration_ms=round(seconds * 1000, 1), quantize=quantize, cute="New clothes for old weights!")
        return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in label).strip("-.") or "model"
