"""The architectures the converter knows, one small table per family."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.models.convert.errors import ConvertError
from worker.models.convert.families.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from worker.models.convert.families.gemma import GEMMA, GEMMA2, GEMMA3
from worker.models.convert.families.llama import GRANITE, LLAMA, MIXTRAL, SMOLLM3
from worker.models.convert.families.olmo2 import OLMO2
from worker.models.convert.families.phi2 import PHI2
from worker.models.convert.families.phi3 import PHI3
from worker.models.convert.families.qwen import QWEN2, QWEN2MOE, QWEN3, QWEN3MOE
from worker.models.convert.family import Family

FAMILIES: tuple[Family, ...] = (LLAMA, MIXTRAL, QWEN2, QWEN2MOE, QWEN3, QWEN3MOE, PHI2, PHI3, GEMMA, GEMMA2, GEMMA3,
                                SMOLLM3, GRANITE, OLMO2, DEEPSEEK_V2, DEEPSEEK_V3)
BY_HF_ARCHITECTURE: dict[str, Family] = {hf: f for f in FAMILIES for hf in f.hf_architectures}


def family_for(config: Mapping[str, Any], where: str = "config.json") -> Family:
    names = config.get("architectures") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConvertError(f"{where}: architectures must be a list of names, such as [\"LlamaForCausalLM\"], "
                           f"not {names!r}")
    for name in names:
        if name in BY_HF_ARCHITECTURE:
            return BY_HF_ARCHITECTURE[name]
    asked = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise ConvertError(f"{where}: unsupported architecture {asked}; supported: {', '.join(BY_HF_ARCHITECTURE)}")
