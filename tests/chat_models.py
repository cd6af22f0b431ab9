"""Tiny random-weight Qwen 3 and Llama 3.1 checkpoints with their families' real chat templates (tool support
included), converted to GGUF by the worker's own converter: models whose calls only constrained decoding can make
valid, for the end-to-end tool-call tests.

The templates are the models' own (tests/data/chat_templates/, copied from the published tokenizer_config.json
files); the vocabularies are trained on tests/convert_reference.CORPUS, with the families' markup tokens added as
the real tokenizers add them: Qwen's `<tool_call>`/`</tool_call>`/`<think>`/`</think>` as added, non-special tokens
(user-defined in the GGUF), Llama 3's `<|python_tag|>`, `<|eom_id|>`, `<|eot_id|>` and headers as special ones.

    from tests.chat_models import tool_model_gguf       # the helper: the converted .gguf under a folder
    path = tool_model_gguf("qwen3", tmp_path)           # "qwen3" or "llama3_1"

    from tests.chat_models import qwen3_tools_gguf      # or the session fixtures, imported into the test module
                                                        # (or a conftest) so that pytest finds them
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.convert_reference import (
    LLAMA3_REGEX,
    QWEN2_REGEX,
    byte_level_tokenizer,
    tiny_config,
    tiny_weights,
    vocab_size_of,
    write_checkpoint,
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]  # special: false in Qwen's tokenizer.json
LLAMA31_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


def make_tool_checkpoint(folder: Path, family: str, seed: int = 0) -> Path:
    """A random-weight checkpoint of `family` ("qwen3" or "llama3_1") in `folder`, with its chat template."""
    if family == "qwen3":
        tokenizer = byte_level_tokenizer(QWEN2_REGEX, 300, QWEN3_SPECIALS + QWEN3_ADDED)
        for added in tokenizer["added_tokens"]:
            if added["content"] in QWEN3_ADDED:
                added["special"] = False
        arch = "qwen3"
        ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
        overrides = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
        tok_config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                      "add_bos_token": False, "chat_template": template("qwen3")}
    elif family == "llama3_1":
        tokenizer = byte_level_tokenizer(LLAMA3_REGEX, 300, LLAMA31_SPECIALS)
        arch = "llama"
        ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
        overrides = {"bos_token_id": ids["<|begin_of_text|>"],
                     "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
        tok_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
                      "chat_template": template("llama3_1")}
    else:
        raise ValueError(family)
    cfg = {**tiny_config(arch, vocab_size_of(tokenizer)), **overrides, "max_position_embeddings": 4096}
    weights = tiny_weights(cfg, np.random.default_rng(seed))
    write_checkpoint(folder, cfg, weights, tokenizer, tokenizer_config=tok_config)
    return folder


def tool_model_gguf(family: str, root: Path) -> Path:
    """The family's tiny checkpoint, converted to GGUF by the worker's converter (cached under `root`)."""
    from worker.models.convert import ensure_gguf

    folder = make_tool_checkpoint(root / family, family)
    return ensure_gguf(folder, root / "cache")


@pytest.fixture(scope="session")
def qwen3_tools_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tool_model_gguf("qwen3", tmp_path_factory.mktemp("qwen3-tools"))


@pytest.fixture(scope="session")
def llama31_tools_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tool_model_gguf("llama3_1", tmp_path_factory.mktemp("llama31-tools"))
