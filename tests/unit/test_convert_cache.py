"""The conversion cache: keyed by source hashes and options, reused, safe under concurrent starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from tests.convert_reference import make_tiny_checkpoint, save_safetensors
from worker.models.convert import ConvertError, ensure_gguf
from worker.narration import recording


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    return tmp_path / "tiny-llama"


def test_narrates_the_conversion_then_reuses_it(checkpoint: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    with recording() as events:
        first = ensure_gguf(checkpoint, cache)
    actions = [e["action"] for e in events]
    assert actions == ["safetensors_convert_start", "safetensors_convert_complete"]
    start, done = events
    assert start["source_bytes"] > 0 and start["quantize"] == "none"
    assert done["output_bytes"] == first.stat().st_size and done["duration_ms"] > 0
    assert done["architecture"] == "llama" and done["path"] == str(first)
    assert first.parent == cache and first.name.startswith("tiny-llama-") and first.name.endswith(".f16.gguf")

    with recording() as events:
        assert ensure_gguf(checkpoint, cache) == first
    assert [e["action"] for e in events] == ["safetensors_convert_cached"]
    assert sorted(p.name for p in cache.iterdir() if p.suffix == ".gguf") == [first.name]


def test_the_key_follows_sources_and_options(checkpoint: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    f16 = ensure_gguf(checkpoint, cache)
    q8 = ensure_gguf(checkpoint, cache, quantize="q8_0")
    assert q8 != f16 and q8.name.endswith(".q8_0.gguf")
    assert gguf.GGUFReader(q8).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    config = checkpoint / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert ensure_gguf(checkpoint, cache) not in (f16, q8)


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path):
    _, weights = make_tiny_checkpoint(tmp_path / "bad", "llama")
    config = tmp_path / "bad" / "config.json"  # weights 96 wide, config says 97: refused while planning
    config.write_text(config.read_text().replace('"intermediate_size": 96', '"intermediate_size": 97'))
    cache = tmp_path / "cache"
    with pytest.raises(ConvertError, match=r"shape \[96, 64\], but config.json implies \[97, 64\]"):
        ensure_gguf(tmp_path / "bad", cache)
    # a value F16 cannot hold: refused while writing, after the header is out
    config.write_text(config.read_text().replace('"intermediate_size": 97', '"intermediate_size": 96'))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = 1e6
    save_safetensors(tmp_path / "bad" / "model.safetensors", weights)
    with pytest.raises(ConvertError, match="model.layers.1.mlp.down_proj.weight holds values beyond float16"):
        ensure_gguf(tmp_path / "bad", cache)
    assert not [p.name for p in cache.iterdir() if p.suffix in (".gguf", ".tmp")]


def test_unknown_quantization_is_refused_before_any_work(checkpoint: Path, tmp_path: Path):
    with pytest.raises(ConvertError, match="unknown quantization 'q9_9'"):
        ensure_gguf(checkpoint, tmp_path / "cache", quantize="q9_9")


def test_concurrent_conversions_make_one_whole_file(checkpoint: Path, tmp_path: Path):
    """Two processes start at once: one converts, the other waits on the lock and finds its file."""
    cache = tmp_path / "cache"
    script = ("import sys; from pathlib import Path; from worker.narration import recording\n"
              "from worker.models.convert import ensure_gguf\n"
              "with recording() as ev: path = ensure_gguf(Path(sys.argv[1]), Path(sys.argv[2]))\n"
              "print(path, [e['action'] for e in ev])")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(checkpoint), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].split(" ", 1) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    paths = {path for path, _ in outputs}
    assert len(paths) == 1
    assert sum("safetensors_convert_start" in actions for _, actions in outputs) == 1
    assert len(gguf.GGUFReader(paths.pop()).tensors) == 22
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*.tmp"))


def test_settings_offer_exactly_the_quantizations_the_converter_knows():
    import typing

    from worker.config import Settings
    from worker.models.convert import QUANT_TYPES

    choices = typing.get_args(Settings.model_fields["quantize"].annotation)
    assert list(choices) == ["none", *QUANT_TYPES]
    assert str(Settings.model_fields["cache_dir"].default) == "~/.cache/llm-worker-rbee"


@pytest.mark.parametrize("how", ["truncated", "zeroed", "no_record"])
def test_a_damaged_cached_gguf_is_converted_again(checkpoint: Path, tmp_path: Path, how: str):
    cache = tmp_path / "cache"
    first = ensure_gguf(checkpoint, cache)
    whole = first.read_bytes()
    if how == "truncated":
        first.write_bytes(whole[: len(whole) // 2])
    elif how == "zeroed":  # same size, a run of zeros (a crash before the data reached the disk)
        first.write_bytes(whole[:1000] + bytes(4096) + whole[5096:])
    else:
        first.with_name(first.name + ".check").unlink()
    with recording() as events:
        again = ensure_gguf(checkpoint, cache)
    actions = [e["action"] for e in events]
    assert actions == ["convert_cache_damaged", "safetensors_convert_start", "safetensors_convert_complete"]
    assert again == first and again.read_bytes() == whole
    assert str(first) in events[0]["path"]
    with recording() as events:  # and it is trusted again
        assert ensure_gguf(checkpoint, cache) == first
    assert [e["action"] for e in events] == ["safetensors_convert_cached"]


def test_stale_temp_files_are_removed_at_start_but_not_a_running_conversions(checkpoint: Path, tmp_path: Path):
    from filelock import FileLock

    cache = tmp_path / "cache"
    first = ensure_gguf(checkpoint, cache)
    stale = [cache / f".{first.name}.4242-17.tmp", cache / f".{first.name}.4242-17.f16.tmp",
             cache / f".{first.name}.check.4242-17.tmp"]
    for p in stale:
        p.write_bytes(b"half a conversion")
    running = cache / ".other-0123456789abcdef.f16.gguf.777-1.tmp"  # another model, its conversion under way
    running.write_bytes(b"being written")
    unrelated = cache / "notes.txt"
    unrelated.write_text("mine")
    with FileLock(str(cache / "other-0123456789abcdef.f16.gguf") + ".lock"):
        with recording() as events:
            assert ensure_gguf(checkpoint, cache) == first
    assert not any(p.exists() for p in stale)
    assert running.exists() and unrelated.exists()
    cleaned = sorted(e["path"] for e in events if e["action"] == "convert_cache_cleaned")
    assert cleaned == sorted(str(p) for p in stale)
