"""Where converted GGUFs live: --cache-dir, under a key made from the source files' hashes and the options.

A second start finds the file and converts nothing. Two starts at once take a file lock: the second waits and
then finds the first one's file. Files appear whole or not at all (temp file in the same folder, fsync, os.replace,
fsync of the folder). Each GGUF has a `.check` record of its size and sha256, written after it: an entry whose file
no longer matches (truncated, zeroed by a crash or a full disk) or has no record is converted again, not served.
Temp files a killed conversion left behind are removed at the next start.
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

from filelock import FileLock, Timeout

# Bump when the converter's output changes: older cached files are then converted again.
CONVERTER_VERSION = 1
_DIGESTS = "digests.json"
_HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# temp_path's names for a GGUF and its check record: .<name>.gguf[.check].<pid>-<thread>[tag].tmp
_GGUF_TEMP = re.compile(r"\.(.+\.gguf)(?:\.check)?\.\d+-\d+(?:\.[a-z0-9]+)?\.tmp")


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
    digest = sha256_of(path)
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
        durable_replace(tmp, path)


def durable_replace(tmp: Path, final: Path) -> None:
    """os.replace, with the file's bytes on disk before the rename and the rename on disk after it: a crash
    leaves the old file or the whole new one, never a name pointing at unwritten blocks."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def _check_path(gguf_path: Path) -> Path:
    return gguf_path.with_name(gguf_path.name + ".check")


def record_check(gguf_path: Path, digest: str) -> None:
    """Write the size and digest a cached GGUF must keep (after the GGUF itself: a crash between leaves a GGUF
    without a record, which is converted again)."""
    atomic_write_text(_check_path(gguf_path), json.dumps({"size": gguf_path.stat().st_size, "sha256": digest}))


def damage(gguf_path: Path) -> str | None:
    """Why a cached GGUF cannot be served (None: it matches its record). Reads the whole file once."""
    try:
        record = json.loads(_check_path(gguf_path).read_text())
        size, digest = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "it has no record of its size and digest"
    actual = gguf_path.stat().st_size
    if actual != size:
        return f"it is {actual} bytes, {size} were written"
    if sha256_of(gguf_path) != digest:
        return "its content no longer matches the digest recorded when it was written"
    return None


def forget(gguf_path: Path) -> None:
    """Remove a damaged entry and its record (under its lock)."""
    gguf_path.unlink(missing_ok=True)
    _check_path(gguf_path).unlink(missing_ok=True)


def clean_stale_temps(cache_dir: Path) -> list[Path]:
    """Remove the temp files of conversions that were killed (kill -9, power loss). A GGUF's temp files exist only
    while a conversion holds that GGUF's lock: any found while the lock can be taken at once are stale; those of a
    conversion running now (its lock held, in this process or another) are left alone."""
    removed = []
    for tmp in cache_dir.glob(".*.tmp"):
        match = _GGUF_TEMP.fullmatch(tmp.name)
        if match is None:
            continue
        try:
            with lock(cache_dir / match.group(1)).acquire(timeout=0):
                if tmp.exists():
                    tmp.unlink()
                    removed.append(tmp)
        except Timeout:
            continue
    return removed


def remove_own_temps(cache_dir: Path) -> list[Path]:
    """Remove this process's temp files (a conversion it abandons: the process is about to exit)."""
    removed = []
    for tmp in cache_dir.glob(f".*.{os.getpid()}-*.tmp"):
        if _GGUF_TEMP.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
