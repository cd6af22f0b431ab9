"""llguidance against llama.cpp's own grammar sampler (llama_sampler_init_grammar, in the pinned library), one
JSON-schema constraint on the embedded model's vocabulary: the time to constrain one token, on CPU.

    python -m bench.grammar_engines
"""

from __future__ import annotations

import ctypes
import json
import time

import llama_cpp as lc
import numpy as np
from llama_cpp.llama_grammar import json_schema_to_gbnf

from worker.engine.constraints import Grammars
from worker.engine.outputs import Constraint
from worker.llamacpp import Model
from worker.models.resolve import embedded_model_path

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
DOC = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry", "notes"]}'


def main() -> None:
    model = Model.load(embedded_model_path(), ref="bench", fmt="gguf", gpu_layers=0)
    tokens = model.tokenize(DOC, add_special=False)
    n = model.n_vocab
    logits = np.zeros(n, dtype=np.float32)

    grammars = Grammars(model.guidance_tokenizer, lambda t: model.piece(t, special=True), n)
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    grammars.check(constraint)
    guide = grammars.guide(constraint)
    t0 = time.perf_counter()
    for token in tokens:
        guide.mask(logits)
        guide.consume(token)
    guidance_ms = (time.perf_counter() - t0) / len(tokens) * 1000

    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    sampler = lc.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    candidates = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
    applying = 0.0
    for token in tokens:
        candidates["id"] = np.arange(n)  # a fresh candidate array each token, as llama.cpp's sampling builds it
        candidates["logit"] = 0.0
        array = lc.llama_token_data_array(data=candidates.ctypes.data_as(lc.llama_token_data_p), size=n,
                                          selected=-1, sorted=False)
        t1 = time.perf_counter()
        lc.llama_sampler_apply(sampler, ctypes.byref(array))  # the grammar sets what it refuses to -inf
        applying += time.perf_counter() - t1
        lc.llama_sampler_accept(sampler, token)
    llama_ms = applying / len(tokens) * 1000
    lc.llama_sampler_free(sampler)
    print(json.dumps({"vocab": n, "tokens": len(tokens), "llguidance_ms_per_token": round(guidance_ms, 3),
                      "llama_cpp_grammar_ms_per_token": round(llama_ms, 3)}))


if __name__ == "__main__":
    main()
