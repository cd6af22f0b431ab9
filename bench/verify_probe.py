"""What a speculating greedy sequence's steps cost by where its tokens are taken: read on the CPU (the logits row,
then numpy's argmax: what the engine does) or drawn in the graph by a [greedy, token only] chain, which llama.cpp
allows for several outputs of a sequence only with `n_outputs_max_per_seq` > 1 (its samplers then work
transactionally and the graph reserves nodes per output). One sequence; plain steps (1 output) and verify steps
(`--width` outputs, the rejected positions' cells removed after each, as a stretch whose proposals all miss).

    python -m bench.verify_probe --model m.gguf --gpu-layers 999
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llama_cpp as lc
import numpy as np

from bench.llama_raw import fill, load_model
from bench.load import PROMPT
from worker.llamacpp.context import token_only_sampler


def run(model, vocab, n_vocab: int, where: str, per_seq: int, width: int, steps: int) -> float:
    prompt = PROMPT.encode()
    buf = (lc.llama_token * 4096)()
    n_prompt = lc.llama_tokenize(vocab, prompt, len(prompt), buf, 4096, True, False)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = n_prompt + steps + width + 64
    cparams.n_batch = cparams.n_ubatch = max(512, n_prompt)
    cparams.n_seq_max = 1
    cparams.flash_attn_type = 1
    cparams.n_outputs_max_per_seq = per_seq
    ctx = lc.llama_init_from_model(model, cparams)
    chain = None
    if where == "graph":
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        lc.llama_sampler_chain_add(chain, token_only_sampler())
        assert lc.llama_set_sampler(ctx, 0, chain)
    memory = lc.llama_get_memory(ctx)
    batch = lc.llama_batch_init(cparams.n_batch, 0, 1)

    def token_at(index: int) -> int:
        if where == "graph":
            return lc.llama_get_sampled_token_ith(ctx, index)
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, index), shape=(n_vocab,)).argmax())

    fill(batch, [(buf[p], p, 0, int(p == n_prompt - 1)) for p in range(n_prompt)])
    assert lc.llama_decode(ctx, batch) == 0
    pos, last, times = n_prompt, n_prompt - 1, []
    for _ in range(steps):
        t = time.perf_counter()
        token = token_at(last)
        fill(batch, [(token, pos + i, 0, 1) for i in range(width)])
        assert lc.llama_decode(ctx, batch) == 0
        if width > 1:  # every position's token taken, as a verification does; one kept
            for i in range(width):
                token_at(i)
            lc.llama_memory_seq_rm(memory, 0, pos + 1, -1)
        pos, last = pos + 1, 0
        times.append(time.perf_counter() - t)
    lc.llama_synchronize(ctx)
    if chain is not None:
        lc.llama_set_sampler(ctx, 0, None)
        lc.llama_sampler_free(chain)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    return statistics.median(times[10:]) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=999)
    ap.add_argument("--width", type=int, default=8, help="outputs of a verify step: a proposal of width - 1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    model, vocab = load_model(args.model, args.gpu_layers)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    per_seq = args.width + 1
    cases = [("cpu", 1, 1), ("graph", 1, 1), ("graph", per_seq, 1), ("cpu", 1, args.width),
             ("graph", per_seq, args.width)]
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(args.rounds):  # cases alternated, the best round of each kept
        for case in cases:
            best[case] = min(best.get(case, float("inf")), run(model, vocab, n_vocab, *case, args.steps))
    for (where, limit, width), ms in best.items():
        print(json.dumps({"token_taken": where, "n_outputs_max_per_seq": limit, "outputs": width,
                          "step_ms": round(ms, 4)}), flush=True)
    lc.llama_model_free(model)


if __name__ == "__main__":
    main()
