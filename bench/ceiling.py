"""The engine ceiling: llama.cpp's decode loop in-process, no HTTP, no scheduler.

B sequences, one llama_decode per step for all of them, one llama_sampler_sample per sequence and step,
the same model, threads and sampling as the worker. What the worker loses against this is its own overhead.

    python -m bench.ceiling --streams 1,4 --tokens 256
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import llama_cpp as lc

from bench.load import PROMPT
from worker.config import default_threads
from worker.llamacpp.backend import init_backend, route_ggml_log
from worker.narration import configure


def ceiling(model_path: str, *, streams: int, tokens: int, threads: int, threads_batch: int | None = None,
            gpu_layers: int = 0,
            sampling: dict | None = None, backend_sampling: bool = False, flash_attn: int | None = None) -> dict:
    sampling = sampling if sampling is not None else {"temperature": 0.8, "top_k": 40, "top_p": 0.95}
    init_backend()  # llama.cpp's log goes to our logger, quiet unless asked
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    model = lc.llama_model_load_from_file(model_path.encode(), mparams)
    vocab = lc.llama_model_get_vocab(model)
    prompt = PROMPT.encode()
    buf = (lc.llama_token * 4096)()
    n_prompt = lc.llama_tokenize(vocab, prompt, len(prompt), buf, 4096, True, False)
    prompt_tokens = list(buf[:n_prompt])

    cparams = lc.llama_context_default_params()
    cparams.n_ctx = (n_prompt + tokens + 8) * streams
    cparams.n_batch = cparams.n_ubatch = max(512, n_prompt * streams)
    cparams.n_seq_max = streams
    cparams.n_threads = threads  # llama.cpp uses these for single-token batches
    cparams.n_threads_batch = threads_batch or threads  # and these for anything larger
    cparams.kv_unified = False
    # as the worker's --flash-attn auto: on with the GPU, off on the CPU
    cparams.flash_attn_type = flash_attn if flash_attn is not None else (1 if gpu_layers else 0)
    ctx = lc.llama_init_from_model(model, cparams)
    mem = lc.llama_get_memory(ctx)
    if gpu_layers:
        route_ggml_log(to_python=False)  # as the worker does in steady decode steps

    chains = []
    for s in range(streams):
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if sampling.get("temperature", 1.0) == 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(sampling["top_k"]))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(sampling["top_p"], 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(sampling["temperature"]))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(1000 + s))
        if backend_sampling:
            lc.llama_set_sampler(ctx, s, chain)
        chains.append(chain)

    batch = lc.llama_batch_init(cparams.n_batch, 0, 1)

    def fill(entries):  # (token, pos, seq, logits)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        batch.n_tokens = len(entries)

    # warm-up, as the worker does at load
    fill([(prompt_tokens[0], 0, 0, 1)])
    lc.llama_decode(ctx, batch)
    lc.llama_memory_clear(mem, True)

    t0 = time.perf_counter()
    fill([(t, p, s, int(p == n_prompt - 1)) for s in range(streams) for p, t in enumerate(prompt_tokens)])
    lc.llama_decode(ctx, batch)
    out_idx = [(s + 1) * n_prompt - 1 for s in range(streams)]
    piece = ctypes.create_string_buffer(64)
    generated = 0
    t_first = None
    for step in range(tokens):
        last = []
        for s in range(streams):
            tok = lc.llama_sampler_sample(chains[s], ctx, out_idx[s])
            lc.llama_token_to_piece(vocab, tok, piece, 64, 0, False)
            last.append(tok)
        generated += streams
        if t_first is None:
            t_first = time.perf_counter()
        if step == tokens - 1:
            break
        fill([(last[s], n_prompt + step, s, 1) for s in range(streams)])
        lc.llama_decode(ctx, batch)
        out_idx = list(range(streams))
    t_end = time.perf_counter()

    for s, chain in enumerate(chains):
        if backend_sampling:
            lc.llama_set_sampler(ctx, s, None)
        lc.llama_sampler_free(chain)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    decode_s = t_end - t_first
    return {
        "streams": streams,
        "tokens": generated,
        "per_stream_tps": (tokens - 1) / decode_s if decode_s > 0 else 0.0,
        "aggregate_tps": generated / (t_end - t0),
        "ttft_ms": (t_first - t0) * 1000,
    }


def main() -> None:
    from worker.models.resolve import embedded_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", default="1")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--threads-batch", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--backend-sampling", action="store_true")
    ap.add_argument("--greedy", action="store_true")
    args = ap.parse_args()
    configure(worker_id=None, level="warning")
    path = args.model or str(embedded_model_path())
    for n in (int(x) for x in args.streams.split(",")):
        fig = ceiling(path, streams=n, tokens=args.tokens, threads=args.threads,
                      threads_batch=args.threads_batch, gpu_layers=args.gpu_layers,
                      sampling={"temperature": 0} if args.greedy else None, backend_sampling=args.backend_sampling)
        print(fig, flush=True)


if __name__ == "__main__":
    main()
