"""Where one stream's sampling time goes: the same decode loop with the sampler chain split in different places.

    python -m bench.sampling_probe --model m.gguf --gpu-layers 99

Variants (one stream, temperature 0.8 / top-k 40 / top-p 0.95 unless greedy):
- raw: no sampler at all, a fixed next token, logits copied to the host as llama-bench does;
- greedy-gpu: argmax in the graph;
- gpu: the whole chain in the graph (top-k, top-p, temperature, dist);
- split: top-k in the graph, the rest on the host over the k survivors;
- cpu: the whole chain on the host over the full vocabulary.

Each line also splits a token's time: launch_us (llama_decode, which only queues the step on a GPU), wait_us (the
first read of the result, which waits for the GPU) and other_us (Python around them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import llama_cpp as lc

from bench.load import PROMPT
from worker.llamacpp.backend import init_backend, route_ggml_log
from worker.narration import configure


def chain_of(*samplers):
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for s in samplers:
        lc.llama_sampler_chain_add(chain, s)
    return chain


def run(model, vocab, variant: str, tokens: int, threads: int, rounds: int) -> dict:
    prompt = PROMPT.encode()
    buf = (lc.llama_token * 4096)()
    n_prompt = lc.llama_tokenize(vocab, prompt, len(prompt), buf, 4096, True, False)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = 1024
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.flash_attn_type = 1
    ctx = lc.llama_init_from_model(model, cparams)
    mem = lc.llama_get_memory(ctx)

    host = None
    if variant == "greedy-gpu":
        dev = chain_of(lc.llama_sampler_init_greedy())
    elif variant == "gpu":
        dev = chain_of(lc.llama_sampler_init_top_k(40), lc.llama_sampler_init_top_p(0.95, 1),
                       lc.llama_sampler_init_temp(0.8), lc.llama_sampler_init_dist(1234))
    elif variant == "split":
        dev = chain_of(lc.llama_sampler_init_top_k(40))
        host = chain_of(lc.llama_sampler_init_top_p(0.95, 1), lc.llama_sampler_init_temp(0.8),
                        lc.llama_sampler_init_dist(1234))
    elif variant == "cpu":
        dev = None
        host = chain_of(lc.llama_sampler_init_top_k(40), lc.llama_sampler_init_top_p(0.95, 1),
                        lc.llama_sampler_init_temp(0.8), lc.llama_sampler_init_dist(1234))
    else:  # raw
        dev = None
    if dev is not None:
        lc.llama_set_sampler(ctx, 0, dev)

    batch = lc.llama_batch_init(512, 0, 1)

    def fill(entries):
        for i, (tok, pos, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = 0, logits
        batch.n_tokens = len(entries)

    def next_token(idx):
        if host is not None:
            return lc.llama_sampler_sample(host, ctx, idx)
        if dev is not None:
            return lc.llama_sampler_sample(dev, ctx, idx)
        lc.llama_get_logits_ith(ctx, idx)  # waits for the step, as llama-bench's synchronize does
        return 1000

    results = []
    candidates = None
    for _ in range(rounds + 1):  # the first round warms up
        lc.llama_memory_clear(mem, True)
        fill([(buf[p], p, int(p == n_prompt - 1)) for p in range(n_prompt)])
        lc.llama_decode(ctx, batch)
        tok = next_token(n_prompt - 1)
        t0 = time.perf_counter()
        launch = wait = 0.0
        for step in range(tokens):
            fill([(tok, n_prompt + step, 1)])
            a = time.perf_counter()
            lc.llama_decode(ctx, batch)
            b = time.perf_counter()
            tok = next_token(0)
            c = time.perf_counter()
            launch += b - a
            wait += c - b
        total = time.perf_counter() - t0
        results.append(tokens / total)
        split = {"launch_us": round(launch / tokens * 1e6, 1), "wait_us": round(wait / tokens * 1e6, 1),
                 "other_us": round((total - launch - wait) / tokens * 1e6, 1)}
        if variant == "split":
            candidates = lc.llama_get_sampled_candidates_count_ith(ctx, 0)
    if dev is not None:
        lc.llama_set_sampler(ctx, 0, None)
        lc.llama_sampler_free(dev)
    if host is not None:
        lc.llama_sampler_free(host)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    out = {"variant": variant, "tok_s": round(statistics.median(results[1:]), 1),
           "rounds": [round(r, 1) for r in results[1:]], **split}
    if candidates is not None:
        out["host_candidates"] = candidates
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=99)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="raw,greedy-gpu,gpu,split,cpu")

    args = ap.parse_args()
    configure(worker_id=None, level="warning")
    init_backend()
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = args.gpu_layers
    model = lc.llama_model_load_from_file(args.model.encode(), mparams)
    if args.gpu_layers:
        route_ggml_log(to_python=False)  # as the worker does in steady decode steps
    vocab = lc.llama_model_get_vocab(model)
    for v in args.variants.split(","):
        print(run(model, vocab, v, args.tokens, args.threads, args.rounds), flush=True)
    lc.llama_model_free(model)


if __name__ == "__main__":
    main()
