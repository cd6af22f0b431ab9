"""What llama.cpp cannot compute is refused, naming the config key or tensor, never converted into another model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.convert_reference import make_tiny_checkpoint, save_safetensors
from worker.models.convert.convert import convert_checkpoint
from worker.models.convert.errors import ConvertError
from worker.models.convert.families import BY_HF_ARCHITECTURE, family_for


@pytest.mark.parametrize("arch,overrides,needle", [
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob is False; llama.cpp's qwen3moe implements only True"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob is True; llama.cpp's qwen2moe implements only False"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "mlp_only_layers is [1]"),
    ("phi", {"qk_layernorm": True}, "qk_layernorm is True"),
    ("phi", {"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ("smollm3", {"no_rope_layers": [1, 1, 1, 1]}, "no_rope_layers [1, 1, 1, 1] differs from every 4th layer"),
    ("deepseek_v3", {"topk_method": "group_limited_greedy"}, "ranks expert groups only as noaux_tc does"),
    ("deepseek_v3", {"scoring_func": "sqrt"}, "scoring_func 'sqrt'"),
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq is 2"),
    ("deepseek_v3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5}},
     "mscale 1.0 and mscale_all_dim 0.5 differ"),
])
def test_configs_llama_cpp_computes_differently_are_refused(tmp_path: Path, arch: str, overrides: dict,
                                                            needle: str):
    make_tiny_checkpoint(tmp_path / "m", arch, **overrides)
    with pytest.raises(ConvertError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        convert_checkpoint(tmp_path / "m", tmp_path / "out.gguf")


@pytest.mark.parametrize("overrides,needle", [
    ({"rms_norm_eps": float("nan")}, "config.json: rms_norm_eps is nan"),
    ({"rope_theta": float("inf")}, "config.json: rope_theta is inf"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": -2.0}}, "config.json: rope_scaling: factor is -2.0"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of names"),
    ({"architectures": [5]}, "architectures must be a list of names"),
])
def test_a_config_llama_cpp_would_not_load_is_refused_before_anything_is_written(tmp_path: Path, overrides: dict,
                                                                                 needle: str):
    """llama.cpp refused such a GGUF only when it was served, after the converter had written and cached it."""
    make_tiny_checkpoint(tmp_path / "m", "llama", **overrides)
    with pytest.raises(ConvertError, match=needle):
        convert_checkpoint(tmp_path / "m", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_a_config_that_is_not_an_object_is_refused(tmp_path: Path):
    make_tiny_checkpoint(tmp_path / "m", "llama")
    (tmp_path / "m" / "config.json").write_text("[]")
    with pytest.raises(ConvertError, match="config.json: must be a JSON object, not list"):
        convert_checkpoint(tmp_path / "m", tmp_path / "out.gguf")


def test_a_missing_expert_is_named(tmp_path: Path):
    _, weights = make_tiny_checkpoint(tmp_path / "m", "mixtral")
    for w in ("w1", "w2", "w3"):
        del weights[f"model.layers.1.block_sparse_moe.experts.2.{w}.weight"]
    save_safetensors(tmp_path / "m" / "model.safetensors", weights)
    with pytest.raises(ConvertError, match=r"layers.1.block_sparse_moe.experts.w\d: config.json says 4 experts, "
                                           r"the checkpoint has 3 \(expert ids \[2\] differ\)"):
        convert_checkpoint(tmp_path / "m", tmp_path / "out.gguf")


def test_unsupported_architecture_lists_every_family():
    with pytest.raises(ConvertError) as info:
        family_for({"architectures": ["MambaForCausalLM"]})
    listed = str(info.value).split("supported: ")[1].split(", ")
    assert listed == list(BY_HF_ARCHITECTURE)
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "PhiForCausalLM",
            "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM",
            "Olmo2ForCausalLM"} <= set(listed)
