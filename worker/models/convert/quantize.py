"""Quantize an F16 GGUF through llama.cpp (the llamacpp layer's quantize_model)."""

from __future__ import annotations

from pathlib import Path

from worker.llamacpp.quantize import QUANT_TYPES, quantize_model
from worker.models.convert.errors import ConvertError


def quantize(src: Path, dst: Path, kind: str) -> None:
    if kind not in QUANT_TYPES:
        raise ConvertError(f"unknown quantization {kind!r}; supported: none, {', '.join(QUANT_TYPES)}")
    rc = quantize_model(src, dst, kind)
    if rc != 0:
        raise ConvertError(f"llama.cpp could not quantize {src.name} to {kind} (llama_model_quantize returned {rc})")
