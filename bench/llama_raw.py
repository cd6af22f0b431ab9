"""The llama.cpp pieces the low-level probes share (bench/*_probe.py): a model loaded as the worker loads it, and a
batch filled from (token, position, sequence, wants logits) entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llama_cpp as lc

from worker.llamacpp.backend import init_backend, route_ggml_log
from worker.narration import configure


def load_model(path: str, gpu_layers: int) -> tuple[Any, Any]:
    """The model and its vocabulary; llama.cpp's log quiet, as the worker keeps it in steady decode steps."""
    configure(worker_id=None, level="warning")
    init_backend()
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    model = lc.llama_model_load_from_file(path.encode(), mparams)
    route_ggml_log(to_python=False)
    return model, lc.llama_model_get_vocab(model)


def fill(batch: Any, entries: Sequence[tuple[int, int, int, int]]) -> None:
    """The batch's tokens: (token, position, sequence, logits wanted) each."""
    for i, (tok, pos, seq, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits
    batch.n_tokens = len(entries)
