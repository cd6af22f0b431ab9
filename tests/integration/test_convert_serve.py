"""The real worker process on SafeTensors: from a folder, from the local hub cache, the convert command, errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import gguf
import numpy as np
import pytest

from tests.convert_reference import make_hub_repo, make_tiny_checkpoint, save_safetensors
from tests.integration.worker_process import WorkerProcess


def _ask(url: str) -> tuple[dict, dict]:
    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/inference", json={"prompt": "Hello world", "max_tokens": 4,
                                                               "temperature": 0, "stream": False}) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            async with http.get(f"{url}/health") as resp:
                return body, await resp.json()

    return asyncio.run(go())


def test_serves_a_safetensors_folder_and_reuses_the_conversion(tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "tiny-llama", "llama", dtype="BF16")
    args = ["--model", str(tmp_path / "tiny-llama"), "--cache-dir", str(tmp_path / "cache"), "--ctx-size", "128"]
    w = WorkerProcess(args).start()
    try:
        body, health = _ask(w.url)
        assert body["tokens_out"] == 4 and body["prompt_tokens"] > 0
        assert health["model"]["format"] == "safetensors" and health["model"]["architecture"] == "llama"
        assert health["model"]["quantization"] == "F16"
        actions = w.actions()
        assert actions.index("safetensors_convert_start") < actions.index("safetensors_convert_complete") \
            < actions.index("model_resolve") < actions.index("model_load_complete")
        done = next(e for e in w.events if e.get("action") == "safetensors_convert_complete")
        assert done["source_bytes"] > 0 and done["output_bytes"] > 0 and done["duration_ms"] > 0
    finally:
        w.stop()
    again = WorkerProcess(args).start()
    try:
        assert "safetensors_convert_start" not in again.actions()
        assert "safetensors_convert_cached" in again.actions()
    finally:
        again.stop()


def test_a_truncated_cached_conversion_is_redone_not_a_crash_loop(tmp_path: Path):
    """A cached GGUF cut short (a crash, a full disk) made every later start exit 3 until someone deleted it."""
    make_tiny_checkpoint(tmp_path / "tiny-llama", "llama")
    args = ["--model", str(tmp_path / "tiny-llama"), "--cache-dir", str(tmp_path / "cache"), "--ctx-size", "128"]
    w = WorkerProcess(args).start()
    w.stop()
    cached = Path(w.wait_for("safetensors_convert_complete")["path"])
    (tmp_path / "cache" / f".{cached.name}.999999-1.tmp").write_bytes(b"left by kill -9")
    cached.write_bytes(cached.read_bytes()[:4096])
    again = WorkerProcess(args).start()
    try:
        body, _ = _ask(again.url)
        assert body["tokens_out"] == 4
        actions = again.actions()
        assert "convert_cache_cleaned" in actions and "convert_cache_damaged" in actions
        assert "safetensors_convert_complete" in actions
    finally:
        again.stop()
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_serves_an_hf_ref_from_the_local_hub_cache(tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "src", "gemma2")
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    make_hub_repo(tmp_path / "hub", "tiny-org/tiny-gemma2", files)
    args = ["--model", "hf:tiny-org/tiny-gemma2", "--cache-dir", str(tmp_path / "cache"), "--ctx-size", "128"]
    w = WorkerProcess(args, env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}).start()
    try:
        body, health = _ask(w.url)
        assert body["tokens_out"] >= 1
        assert health["model"]["ref"] == "tiny-org/tiny-gemma2" and health["model"]["architecture"] == "gemma2"
    finally:
        w.stop()


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


def test_convert_command_writes_the_gguf(tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "m", "qwen3")
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    result = _run("convert", str(tmp_path / "m"), str(out), "--quantize", "q8_0", "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert "safetensors_convert_complete" in result.stderr
    again = _run("convert", str(tmp_path / "m"), str(out), "--quantize", "q8_0", "--cache-dir", str(tmp_path / "c"))
    assert again.returncode == 0 and "safetensors_convert_start" not in again.stderr  # the cache answered


def test_convert_command_usage_errors(tmp_path: Path):
    assert _run("convert").returncode == 2
    assert _run("convert", str(tmp_path), "x.gguf", "--quantize", "q9_9").returncode == 2
    result = _run("convert", str(tmp_path / "nothing-here"), str(tmp_path / "x.gguf"))
    assert result.returncode == 3 and "nothing-here" in result.stderr


def _break(folder: Path, how: str) -> str:
    """Damage a tiny checkpoint one way; return a phrase the error message must contain."""
    if how == "architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
        return "unsupported architecture MambaForCausalLM; supported: LlamaForCausalLM, MistralForCausalLM"
    if how == "config":
        (folder / "config.json").unlink()
        return "no config.json"
    if how == "tokenizer":
        (folder / "tokenizer.json").unlink()
        return "no tokenizer.json"
    if how == "weights":
        (folder / "model.safetensors").unlink()
        return "no weights"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["architecture", "config", "tokenizer", "weights", "shape", "truncated"])
def test_a_broken_checkpoint_exits_3_naming_the_problem(tmp_path: Path, how: str):
    folder = tmp_path / "broken"
    _, weights = make_tiny_checkpoint(folder, "llama")
    if how == "shape":
        weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.k_proj.weight"][:16]
        save_safetensors(folder / "model.safetensors", weights)
        needle = "tensor model.layers.1.self_attn.k_proj.weight has shape [16, 64], but config.json implies [32, 64]"
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
        needle = "truncated safetensors file"
    else:
        needle = _break(folder, how)
    result = _run("--port", "0", "--model", str(folder), "--cache-dir", str(tmp_path / "cache"), "--log-format", "json")
    assert result.returncode == 3, result.stderr
    failed = [json.loads(line) for line in result.stderr.splitlines() if '"model_load_failed"' in line]
    assert failed and needle in failed[0]["human"], result.stderr
    assert not list((tmp_path / "cache").glob("*.gguf"))


def test_hf_ref_missing_from_the_offline_cache_exits_3(tmp_path: Path):
    import os

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = _run("--port", "0", "--model", "hf:nobody/nothing", "--cache-dir", str(tmp_path / "c"), env=env)
    assert result.returncode == 3
    assert "nobody/nothing is not in the local hub cache" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr


def test_bf16_weights_are_read_exactly(tmp_path: Path):
    """bf16 → f32 widening then f16: every bf16 value of normal magnitude survives unchanged into the GGUF."""
    make_tiny_checkpoint(tmp_path / "m", "qwen2", dtype="BF16")
    result = _run("convert", str(tmp_path / "m"), str(tmp_path / "m.gguf"), "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    from worker.models.convert.safetensors import Checkpoint

    source = Checkpoint(tmp_path / "m").load("model.layers.0.mlp.up_proj.weight")
    converted = np.asarray(tensors["blk.0.ffn_up.weight"].data).astype(np.float32)
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    normal = np.abs(source) >= 2.0**-14  # below that, float16 is subnormal and keeps fewer bits
    assert np.array_equal(converted[normal], source[normal])
    assert np.allclose(converted, source, rtol=0, atol=2.0**-24)
