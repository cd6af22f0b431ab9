"""The SafeTensors reader: dtypes without torch, sharded checkpoints, broken files, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.convert_reference import make_tiny_checkpoint, round_to, save_safetensors
from worker.models.convert.errors import ConvertError
from worker.models.convert.safetensors import Checkpoint, read_header, weight_files
from worker.models.resolve import ModelResolveError


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_each_dtype_reads_back_as_float32(dtype: str, tmp_path: Path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": np.array([1e-3, -2.5, 65000.0], np.float32),
               "empty": np.zeros((0, 4), np.float32)}
    save_safetensors(tmp_path / "model.safetensors", tensors, dtype)
    ckpt = Checkpoint(tmp_path)
    for name, x in tensors.items():
        got = ckpt.load(name)
        assert got.dtype == np.float32 and got.shape == x.shape
        assert np.array_equal(got, round_to(x, dtype))
    if dtype == "BF16":  # widening is exact: bf16 values are float32 values with 16 zero low bits
        assert not np.array_equal(ckpt.load("a"), tensors["a"])


def test_sharded_checkpoint_loads_through_its_index(tmp_path: Path):
    _, weights = make_tiny_checkpoint(tmp_path, "llama", shards=3)
    (tmp_path / "consolidated.safetensors").write_bytes(b"not listed in the index, never read")
    ckpt = Checkpoint(tmp_path)
    assert [f.name for f in ckpt.files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(ckpt.tensors) == set(weights)
    assert np.array_equal(ckpt.load("model.norm.weight"), weights["model.norm.weight"])


def test_a_shard_missing_from_the_index_is_named(tmp_path: Path):
    make_tiny_checkpoint(tmp_path, "llama", shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConvertError, match="model-00002-of-00002.safetensors"):
        weight_files(tmp_path)


def test_no_weights_at_all(tmp_path: Path):
    with pytest.raises(ConvertError, match="no weights"):
        weight_files(tmp_path)


@pytest.mark.parametrize("keep", [5, 200, -10])
def test_truncated_file_is_an_error(tmp_path: Path, keep: int):
    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"w": np.ones((16, 16), np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ConvertError, match="truncated safetensors file") as info:
        read_header(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ModelResolveError)  # the worker exits 3 on it


def test_unsupported_dtype_is_named(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"q": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ConvertError, match="F8_E4M3"):
        read_header(path)


def test_conversion_memory_is_bounded_by_one_tensor(tmp_path: Path):
    """Convert a 400 MB checkpoint in a child process: its peak RSS grows by about one tensor, not the model."""
    big = {"hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4, "num_attention_heads": 8,
           "num_key_value_heads": 8}
    make_tiny_checkpoint(tmp_path / "big", "qwen3", head_dim=128, **big)
    source = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    largest = 8192 * 1024 * 4
    # VmHWM: this process image's peak RSS (ru_maxrss would carry over the parent's peak through fork).
    script = """
import re, sys
from pathlib import Path
from worker.models.convert.convert import convert_checkpoint
from worker.models.convert.safetensors import Checkpoint

def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

Checkpoint(Path(sys.argv[1]))  # imports and headers: the baseline
base = peak_kb()
convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[1]) / "out.gguf")
print(peak_kb() - base)
"""
    grown = int(subprocess.run([sys.executable, "-c", script, str(tmp_path / "big")], check=True,
                               capture_output=True, text=True).stdout) * 1024
    assert source > 350e6
    print(f"peak RSS grew by {grown / 1e6:.0f} MB for {source / 1e6:.0f} MB of weights "
          f"(largest tensor {largest / 1e6:.0f} MB)")
    assert grown < 4 * largest < source


def test_moe_conversion_memory_is_bounded_by_one_stacked_expert_tensor(tmp_path: Path):
    """A Mixtral of 4 layers x 8 experts: experts are stacked one at a time into the F16 3-D tensor, so the peak
    grows by about one projection of one layer's experts (measured: 15 MB for 8.4 MB), below one layer's experts
    (25 MB in F16), far below the model."""
    big = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_local_experts": 8,
           "num_attention_heads": 4, "num_key_value_heads": 4}
    make_tiny_checkpoint(tmp_path / "moe", "mixtral", dtype="BF16", **big)
    source = sum(f.stat().st_size for f in (tmp_path / "moe").glob("*.safetensors"))
    stacked = 8 * 1024 * 512 * 2  # one ffn_*_exps tensor in F16
    script = """
import re, sys
from pathlib import Path
from worker.models.convert.convert import convert_checkpoint
from worker.models.convert.safetensors import Checkpoint

def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

Checkpoint(Path(sys.argv[1]))
base = peak_kb()
convert_checkpoint(Path(sys.argv[1]), Path(sys.argv[1]) / "out.gguf")
print(peak_kb() - base)
"""
    grown = int(subprocess.run([sys.executable, "-c", script, str(tmp_path / "moe")], check=True,
                               capture_output=True, text=True).stdout) * 1024
    print(f"peak RSS grew by {grown / 1e6:.1f} MB for {source / 1e6:.0f} MB of weights (one stacked expert "
          f"tensor {stacked / 1e6:.1f} MB, one layer's experts {3 * stacked / 1e6:.1f} MB in F16)")
    assert grown < 3 * stacked < source / 4
