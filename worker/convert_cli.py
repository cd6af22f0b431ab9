"""`llm-worker-rbee convert SRC OUT.gguf [--quantize TYPE]`: the conversion --model does, without serving.

Same code path and cache rules: SRC (a SafeTensors folder or an hf: ref) is converted into --cache-dir (or
found there), then OUT is written atomically from the cached file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from worker.config import ConfigError, load_settings
from worker.exit_codes import ExitCode
from worker.models.errors import ModelResolveError
from worker.models.resolve import resolve
from worker.narration import configure


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-worker-rbee convert",
                                     description="Convert a SafeTensors folder or hf:<org>/<repo> to a GGUF file.")
    parser.add_argument("source", help="a SafeTensors folder (config.json, tokenizer.json, *.safetensors) or hf: ref")
    parser.add_argument("output", type=Path, help="the .gguf file to write")
    parser.add_argument("--quantize", help="none (F16, the default), q8_0, q4_k_m, …")
    parser.add_argument("--cache-dir", help="where converted GGUFs are kept (default ~/.cache/llm-worker-rbee)")
    parser.add_argument("--config", help="TOML settings file (its quantize and cache_dir apply)")
    parser.add_argument("--log-format", help="json or pretty")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message
        return ExitCode.OK if exc.code == 0 else ExitCode.CONFIG
    # The serve path's settings (flags > env > TOML > defaults) decide quantize and cache_dir here too.
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
             if name in ("quantize", "cache_dir", "config", "log_format") and value is not None]
    try:
        settings = load_settings(flags, serving=False)
    except ConfigError as exc:
        print(f"llm-worker-rbee convert: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    configure(worker_id=None, log_format=settings.log_format, level=settings.log_level)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_handler(settings.cache_dir.expanduser(), args.output))
    try:
        resolved = resolve(args.source, cache_dir=settings.cache_dir, quantize=settings.quantize)
    except ModelResolveError as exc:
        print(f"llm-worker-rbee convert: {exc}", file=sys.stderr)
        return ExitCode.MODEL
    if resolved.format != "safetensors":
        print(f"llm-worker-rbee convert: {args.source} is already a GGUF ({resolved.path}); nothing to convert",
              file=sys.stderr)
        return ExitCode.CONFIG
    try:
        _publish(resolved.path, args.output)
    except OSError as exc:
        print(f"llm-worker-rbee convert: cannot write {args.output}: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    print(args.output)
    return ExitCode.OK


def _stop_handler(cache_dir: Path, out: Path) -> Callable[[int, FrameType | None], None]:
    """A stop signal ends the conversion as a shell expects of a command it interrupted (128 + the signal's number:
    130 for SIGINT, 143 for SIGTERM), with a line instead of a traceback, and this process's temp files removed (a
    conversion renamed into the cache with its record stays: the next run finds it)."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        from worker.models.convert.cache import remove_own_temps

        removed = remove_own_temps(cache_dir) if cache_dir.is_dir() else []
        _temp_for(out).unlink(missing_ok=True)
        print(f"llm-worker-rbee convert: stopped by {signal.Signals(signum).name}; {out} not written"
              f"{f', {len(removed)} temp file(s) removed' if removed else ''}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    return stop


def _temp_for(out: Path) -> Path:
    out = out.expanduser().resolve()
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


def _publish(cached: Path, out: Path) -> None:
    """Make `out` a complete copy of `cached`, or leave it untouched: temp file beside it, then rename."""
    out = out.expanduser().resolve()
    tmp = _temp_for(out)
    try:
        try:
            os.link(cached, tmp)  # same filesystem: no copy of gigabytes
        except OSError:
            shutil.copyfile(cached, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
