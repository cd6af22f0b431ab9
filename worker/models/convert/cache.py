"""Where converted GGUFs live: --cache-dir, under a key made from the source files' hashes and the options.

A second start finds the file and converts nothing. Two starts at once take a file lock: the second waits and
then finds the first one's file. Files appear whole or not at all (temp file in the same folder, os.replace).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

# Bump when the converter's output changes: older cached files are then converted again.
CONVERTER_VERSION = 1
_DIGESTS = "digests.json"
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def cache_key(files: list[Path], options: dict, cache_dir: Path) -> str:
    sources = {f.name: file_digest(f, cache_dir) for f in files}
    blob = json.dumps({"converter": CONVERTER_VERSION, "options": options, "sources": sources}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_digest(path: Path, cache_dir: Path) -> str:
    """The file's sha256. Hub snapshots already name it: their files link to blobs/<hash>."""
    if path.is_symlink() and path.resolve().parent.name == "blobs" and _HUB_BLOB.fullmatch(path.resolve().name):
        return path.resolve().name
    # Hashing a 15 GB checkpoint takes a while: remember digests by path, size and mtime.
    stat = path.stat()
    memo_key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = _read_memo(cache_dir)
    if memo_key in memo:
        return memo[memo_key]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    digest = sha.hexdigest()
    memo = _read_memo(cache_dir)
    memo[memo_key] = digest
    atomic_write_text(cache_dir / _DIGESTS, json.dumps(memo))
    return digest


def _read_memo(cache_dir: Path) -> dict[str, str]:
    try:
        return json.loads((cache_dir / _DIGESTS).read_text())
    except (OSError, ValueError):
        return {}


def atomic_write_text(path: Path, text: str) -> None:
    with temp_path(path) as tmp:
        tmp.write_text(text)
        os.replace(tmp, path)


@contextlib.contextmanager
def temp_path(final: Path, tag: str = "") -> Iterator[Path]:
    """A unique temp file next to `final` (same filesystem, so os.replace is atomic); removed if left over."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{threading.get_ident()}{tag}.tmp")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock")
