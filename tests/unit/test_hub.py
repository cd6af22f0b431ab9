"""hf: references through a local huggingface-hub cache (HF_HUB_CACHE=tmp, HF_HUB_OFFLINE=1): nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.convert_reference import make_hub_repo, make_tiny_checkpoint
from worker.models.hub import parse_hf_ref, resolve_hf
from worker.models.resolve import ModelResolveError, resolve


@pytest.fixture
def hub(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_parse():
    assert parse_hf_ref("hf:org/repo") == parse_hf_ref("hf:org/repo:")
    assert parse_hf_ref("hf:org/re.po-1:*Q4_K_M.gguf").pattern == "*Q4_K_M.gguf"
    assert parse_hf_ref("hf:Qwen/Qwen3-0.6B").label == "Qwen--Qwen3-0.6B"
    for bad in ("hf:", "hf:repo", "hf:org/", "hf:a/b/c"):
        with pytest.raises(ModelResolveError, match="expected hf:<org>/<repo>"):
            parse_hf_ref(bad)


def test_gguf_files_by_name_glob_or_alone(hub: Path):
    snap = make_hub_repo(hub, "org/one", {"model-Q4_K_M.gguf": b"GGUF1", "README.md": b"hi"})
    assert resolve_hf("hf:org/one") == snap / "model-Q4_K_M.gguf"
    make_hub_repo(hub, "org/many", {"m-Q4_K_M.gguf": b"a", "m-Q8_0.gguf": b"b", "sub/m-F16.gguf": b"c"})
    assert resolve_hf("hf:org/many:m-Q8_0.gguf").name == "m-Q8_0.gguf"
    assert resolve_hf("hf:org/many:*Q4_K_M*").name == "m-Q4_K_M.gguf"
    assert resolve_hf("hf:org/many:sub/*").name == "m-F16.gguf"
    assert resolve_hf("hf:org/many:*Q8_0.gguf").read_bytes() == b"b"  # a link into blobs/
    with pytest.raises(ModelResolveError, match=r"several GGUF models \(m-Q4_K_M.gguf, m-Q8_0.gguf"):
        resolve_hf("hf:org/many")
    with pytest.raises(ModelResolveError, match="no .gguf file matching '\\*Q2_K\\*' in the local hub cache"):
        resolve_hf("hf:org/many:*Q2_K*")


def test_a_split_gguf_is_its_first_part(hub: Path):
    make_hub_repo(hub, "org/split", {"big-Q8_0-00002-of-00002.gguf": b"2", "big-Q8_0-00001-of-00002.gguf": b"1"})
    assert resolve_hf("hf:org/split").name == "big-Q8_0-00001-of-00002.gguf"


def test_a_repository_missing_from_the_cache_is_a_clear_error(hub: Path):
    with pytest.raises(ModelResolveError) as info:
        resolve_hf("hf:org/absent")
    message = str(info.value)
    assert "org/absent is not in the local hub cache" in message and str(hub) in message
    assert "HF_HUB_OFFLINE=1" in message


def test_safetensors_snapshot_converts_into_the_cache_dir(hub: Path, tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "src", "qwen2")
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    snapshot = make_hub_repo(hub, "tiny/qwen2", files)
    assert resolve_hf("hf:tiny/qwen2") == snapshot
    resolved = resolve("hf:tiny/qwen2", cache_dir=tmp_path / "cache")
    assert resolved.format == "safetensors" and resolved.ref == "hf:tiny/qwen2"
    assert resolved.path.parent == tmp_path / "cache" and resolved.path.name.startswith("tiny--qwen2-")
    # the snapshot links to blobs named by their sha256: the cache key needs no hashing of its own
    assert not (tmp_path / "cache" / "digests.json").exists()


def test_gguf_ref_resolves_without_conversion(hub: Path, tmp_path: Path):
    make_hub_repo(hub, "org/gguf", {"x.gguf": b"GGUF"})
    resolved = resolve("hf:org/gguf", cache_dir=tmp_path / "cache")
    assert resolved.format == "gguf" and resolved.path.name == "x.gguf"
    assert not (tmp_path / "cache").exists()


def test_online_it_lists_the_repository_and_fetches_only_what_it_needs(hub: Path, monkeypatch):
    import worker.models.hub as hub_module

    monkeypatch.delenv("HF_HUB_OFFLINE")
    listing: list[str] = []
    fetched: list[tuple] = []
    monkeypatch.setattr(hub_module.HfApi, "list_repo_files", lambda self, repo_id: listing)

    def fake_snapshot(repo_id, allow_patterns=None, ignore_patterns=None, local_files_only=False, cache_dir=None):
        fetched.append((repo_id, allow_patterns, ignore_patterns, local_files_only))
        return str(hub / "snapshot")

    monkeypatch.setattr(hub_module, "snapshot_download", fake_snapshot)
    listing[:] = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    with pytest.raises(ModelResolveError, match="several GGUF models"):
        resolve_hf("hf:org/quants")
    assert fetched == []  # nothing downloaded to find that out
    listing[:] = ["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"]
    assert resolve_hf("hf:org/split") == hub / "snapshot" / "m-Q8_0-00001-of-00002.gguf"
    assert fetched[-1][1] == listing  # both parts, nothing else
    listing[:] = ["config.json", "model.safetensors", "tokenizer.json", "m-Q4_K_M.gguf", "original/consolidated.pth"]
    assert resolve_hf("hf:org/checkpoint") == hub / "snapshot"
    assert fetched[-1][1:] == (["*.json", "*.safetensors", "*.jinja"], ["*/*", "consolidated*"], False)


def test_an_unreachable_hub_falls_back_to_the_cache(hub: Path, monkeypatch):
    import worker.models.hub as hub_module

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def refuse(self, repo_id):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(hub_module.HfApi, "list_repo_files", refuse)
    snapshot = make_hub_repo(hub, "org/cached", {"m.gguf": b"GGUF"})
    assert resolve_hf("hf:org/cached") == snapshot / "m.gguf"
    with pytest.raises(ModelResolveError, match="not in the local hub cache .* and the hub could not be reached"):
        resolve_hf("hf:org/uncached")
