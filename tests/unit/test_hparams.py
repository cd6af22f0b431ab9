"""The hyper-parameter check that runs before llama.cpp loads a GGUF, on metadata-only GGUFs from the gguf package."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from gguf import GGUFWriter

from worker.llamacpp.hparams import HParamError, check_hparams, read_metadata


def write_gguf(path: Path, **extra) -> Path:
    """A metadata-only llama GGUF with sane hyper-parameters; `extra` (key suffix -> callable on the writer) adds or
    overrides."""
    w = GGUFWriter(path, "llama")
    w.add_block_count(4)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(300)])
    for add in extra.values():
        add(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sane_file_passes_and_is_read(tmp_path: Path):
    path = write_gguf(tmp_path / "ok.gguf", ff=lambda w: w.add_feed_forward_length([128, 128, 256, 256]))
    check_hparams(path)
    fields = read_metadata(path)
    assert fields is not None and fields["llama.block_count"].values == [4]
    assert fields["llama.feed_forward_length"].values == [128, 128, 256, 256]


@pytest.mark.parametrize("key,add,needle", [
    ("llama.feed_forward_length", lambda w: w.add_array("llama.feed_forward_length", [128, 128]), "has 2 values"),
    ("llama.feed_forward_length", lambda w: w.add_array("llama.feed_forward_length", [128] * 1000),
     "has 1000 values"),
    ("llama.attention.layer_norm_rms_epsilon", lambda w: w.add_float32("llama.attention.layer_norm_rms_epsilon",
                                                                      math.nan), "not a finite number"),
    ("llama.context_length", lambda w: w.add_string("llama.context_length", "256"), "not string"),
    ("llama.expert_used_count", lambda w: (w.add_expert_count(2), w.add_expert_used_count(4)), "over"),
    ("llama.rope.freq_base", lambda w: w.add_float64("llama.rope.freq_base", 0.0), "over 0"),
])
def test_bad_value_names_the_key(tmp_path: Path, key, add, needle):
    # Later keys of the same name are refused by GGUFWriter: write the bad one instead of the sane default.
    w = GGUFWriter(tmp_path / "bad.gguf", "llama")
    w.add_block_count(4)
    w.add_embedding_length(64)
    add(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HParamError, match=needle) as info:
        check_hparams(tmp_path / "bad.gguf")
    assert key in str(info.value)


def test_missing_block_count_is_refused(tmp_path: Path):
    w = GGUFWriter(tmp_path / "none.gguf", "llama")
    w.add_embedding_length(64)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(HParamError, match="llama.block_count is missing"):
        check_hparams(tmp_path / "none.gguf")


@pytest.mark.parametrize("cut", [0, 10, 30, 200, 1000])
def test_structural_damage_is_left_to_llama_cpp(tmp_path: Path, cut: int):
    whole = write_gguf(tmp_path / "ok.gguf").read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(whole[:cut])
    assert read_metadata(bad) is None
    check_hparams(bad)  # no HParamError: llama.cpp's loader reports what is wrong
