"""`hf:<org>/<repo>[:<file or glob>]` → a GGUF file or a SafeTensors snapshot, through huggingface-hub's cache.

HF_HUB_OFFLINE=1 (huggingface-hub's own switch) uses the cache only; HF_HUB_CACHE moves the cache. Both are
read when a ref is resolved, so they mean the same here as in every other huggingface-hub program.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from worker.models.errors import ModelResolveError

# What a SafeTensors conversion needs from a repository (subfolders and Mistral's consolidated.* left out).
SAFETENSORS_PATTERNS = ["*.json", "*.safetensors", "*.jinja"]
SAFETENSORS_IGNORED = ["*/*", "consolidated*"]
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    pattern: str | None  # a file name or a glob inside the repository

    @property
    def label(self) -> str:
        return self.repo_id.replace("/", "--")


def parse_hf_ref(ref: str) -> HubRef:
    repo_id, _, pattern = ref.removeprefix("hf:").partition(":")
    if not _REPO.fullmatch(repo_id):
        raise ModelResolveError(f"{ref}: expected hf:<org>/<repo>[:<file or glob>]")
    return HubRef(repo_id, pattern or None)


def offline() -> bool:
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_hf(ref: str) -> Path:
    """A .gguf file to load, or a snapshot folder (config.json, tokenizer, *.safetensors) to convert."""
    hub = parse_hf_ref(ref)
    local_only = offline()
    try:
        if hub.pattern:
            folder = _snapshot(hub.repo_id, [hub.pattern], local_only)
            return folder / _model_parts(ref, _files(folder), hub.pattern)[0]
        # Online, list the repository first: fetch the checkpoint, or its one GGUF, never every quantization.
        names = None if local_only else _list_repo(hub.repo_id)
        if names is None:
            folder = _snapshot(hub.repo_id, None, True)
            names = _files(folder)
        elif not _is_checkpoint(names):
            parts = _model_parts(ref, names, "*.gguf")
            return _snapshot(hub.repo_id, parts, False) / parts[0]
        else:
            folder = _snapshot(hub.repo_id, SAFETENSORS_PATTERNS, False, SAFETENSORS_IGNORED)
        if _is_checkpoint(names):
            return folder
        return folder / _model_parts(ref, names, "*.gguf")[0]
    except LocalEntryNotFoundError:
        raise ModelResolveError(
            f"{ref}: {hub.repo_id} is not in the local hub cache ({hub_cache()})"
            + (" and HF_HUB_OFFLINE=1 forbids downloading it" if local_only else " and the hub could not be reached")
        ) from None
    except (HfHubHTTPError, EntryNotFoundError, HFValidationError, OSError) as exc:
        raise ModelResolveError(f"{ref}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None


def _list_repo(repo_id: str) -> list[str] | None:
    """The repository's files, or None when the hub cannot be reached (then the cache answers, as it does
    for huggingface-hub's own downloads). A repository the hub denies or lacks is an error."""
    try:
        return HfApi().list_repo_files(repo_id)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403, 404):
            raise
        return None
    except Exception:
        return None


def _snapshot(repo_id: str, patterns: list[str] | None, local_only: bool, ignore: list[str] | None = None) -> Path:
    return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=ignore,
                                  local_files_only=local_only, cache_dir=hub_cache()))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _is_checkpoint(names: list[str]) -> bool:
    return "config.json" in names and any(n.endswith(".safetensors") and "/" not in n for n in names)


def _model_parts(ref: str, names: list[str], pattern: str) -> list[str]:
    """The files of the one GGUF model among `names` that match: one file, or every part of a split one."""
    matches = sorted(n for n in names if n.endswith(".gguf") and fnmatch.fnmatch(n, pattern))
    # A split GGUF is one model: llama.cpp loads the first part and finds the others next to it.
    firsts = [m for m in matches if (split := _SPLIT.search(m)) is None or split.group(1) == "00001"]
    if len(firsts) == 1:
        first = firsts[0]
        split = _SPLIT.search(first)
        stem = first[: split.start()] if split else None
        return [first] + [m for m in matches if stem and m != first and m.startswith(stem) and _SPLIT.search(m)]
    if not matches:
        where = "in the local hub cache" if offline() else "in the repository"
        if pattern == "*.gguf":
            raise ModelResolveError(f"{ref}: neither a SafeTensors checkpoint nor a .gguf file {where}")
        raise ModelResolveError(f"{ref}: no .gguf file matching {pattern!r} {where}")
    listing = ", ".join(matches[:8]) + (f" and {len(matches) - 8} more" if len(matches) > 8 else "")
    raise ModelResolveError(f"{ref}: several GGUF models ({listing}); choose one with hf:<org>/<repo>:<file or glob>")
