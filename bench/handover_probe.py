"""What a sampler chain in the decode graph hands over to the host, and what that costs a step.

After each in-graph chain, llama.cpp copies to the host the logits and the probabilities its last samplers left
(`copy_tensor_async_rows`): after `dist` at temperature 1 (what a request with no sampling options gets), the whole
row of each, 2 x 4 bytes x the vocabulary a sequence a step. This probe times the same decode loop of B sequences
with chains that hand over different amounts:

- dist: [dist] (temperature 1), the full logits and probabilities rows;
- dist-argmax: [dist, temp 0], the probabilities row only (temp 0 leaves one logit, not changing the draw);
- dist-token: [dist, token only], nothing but the token (a sampler of ours that drops both rows);
- greedy: [temp 0, dist], one logit and one probability (the worker's greedy chain before the token-only sampler);
- greedy-token: [greedy, token only], nothing but the token.
- std-token: [top-k 40, top-p 0.95, temperature 0.8, dist, token only], the worker's chain for standard sampling
  before draws.py;
- group-std, group-full, group-greedy: the same draws (standard; temperature 1 over the whole vocabulary; greedy)
  built once for all sequences of the step (worker/llamacpp/draws.py).

    python -m bench.handover_probe --model m.gguf --gpu-layers 999 --streams 1,8,32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llama_cpp as lc

from bench.llama_raw import fill, load_model
from bench.load import PROMPT
from worker.engine.sampling import SamplingParams
from worker.llamacpp import draws
from worker.llamacpp.context import token_only_sampler
from worker.llamacpp.draws import DrawGroups

VARIANTS = ("dist", "dist-argmax", "dist-token", "greedy", "greedy-token", "std-token", "group-std", "group-full",
            "group-greedy")
GROUP_PARAMS = {"group-std": SamplingParams(temperature=0.8, top_k=40, top_p=0.95),
                "group-full": SamplingParams(temperature=1.0), "group-greedy": SamplingParams(temperature=0.0)}


def chain_of(variant: str, seed: int, draws: DrawGroups):
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    add = lambda s: lc.llama_sampler_chain_add(chain, s)
    if variant in GROUP_PARAMS:
        member = draws.sampler(GROUP_PARAMS[variant])
        assert member is not None
        add(member.ptr)
        return chain
    if variant == "std-token":
        for smpl in (lc.llama_sampler_init_top_k(40), lc.llama_sampler_init_top_p(0.95, 1),
                     lc.llama_sampler_init_temp(0.8), lc.llama_sampler_init_dist(seed), token_only_sampler()):
            add(smpl)
        return chain
    if variant == "greedy":
        add(lc.llama_sampler_init_temp(0.0))
        add(lc.llama_sampler_init_dist(seed))
        return chain
    if variant == "greedy-token":
        add(lc.llama_sampler_init_greedy())
        add(token_only_sampler())
        return chain
    add(lc.llama_sampler_init_dist(seed))
    if variant == "dist-argmax":
        add(lc.llama_sampler_init_temp(0.0))
    elif variant == "dist-token":
        add(token_only_sampler())
    return chain


def run(model, vocab, variant: str, streams: int, tokens: int) -> dict:
    prompt = PROMPT.encode()
    buf = (lc.llama_token * 4096)()
    n_prompt = lc.llama_tokenize(vocab, prompt, len(prompt), buf, 4096, True, False)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = (n_prompt + tokens + 8) * streams
    cparams.n_batch = cparams.n_ubatch = max(512, n_prompt * streams)
    cparams.n_seq_max = streams
    cparams.kv_unified = True
    cparams.flash_attn_type = 1
    ctx = lc.llama_init_from_model(model, cparams)
    draws = DrawGroups(lc.llama_vocab_n_tokens(vocab))
    chains = [chain_of(variant, 1000 + s, draws) for s in range(streams)]
    for s, chain in enumerate(chains):
        assert lc.llama_set_sampler(ctx, s, chain)
    batch = lc.llama_batch_init(cparams.n_batch, 0, 1)
    fill(batch, [(buf[p], p, s, int(p == n_prompt - 1)) for s in range(streams) for p in range(n_prompt)])
    assert lc.llama_decode(ctx, batch) == 0
    out_idx = [(s + 1) * n_prompt - 1 for s in range(streams)]
    steps = []
    for step in range(tokens):
        t = time.perf_counter()
        last = [lc.llama_get_sampled_token_ith(ctx, out_idx[s]) for s in range(streams)]
        fill(batch, [(last[s], n_prompt + step, s, 1) for s in range(streams)])
        assert lc.llama_decode(ctx, batch) == 0
        out_idx = list(range(streams))
        steps.append(time.perf_counter() - t)
    lc.llama_synchronize(ctx)
    for s, chain in enumerate(chains):
        lc.llama_set_sampler(ctx, s, None)
        lc.llama_sampler_free(chain)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    step = statistics.median(steps[8:])
    return {"variant": variant, "streams": streams, "step_ms": round(step * 1000, 3),
            "tps": round(streams / step, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=999)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--stage-above", type=int, default=draws.STAGE_ABOVE,
                    help="group draws: rows longer than this go in stages of blocks (draws.STAGE_ABOVE)")
    args = ap.parse_args()
    draws.STAGE_ABOVE = args.stage_above
    model, vocab = load_model(args.model, args.gpu_layers)
    for streams in (int(x) for x in args.streams.split(",")):
        best: dict[str, dict] = {}
        for _ in range(args.rounds):  # variants alternated, the best round of each kept
            for variant in args.variants.split(","):
                row = run(model, vocab, variant, streams, args.tokens)
                if variant not in best or row["step_ms"] < best[variant]["step_ms"]:
                    best[variant] = row
        base = best[args.variants.split(",")[0]]["step_ms"]
        for row in best.values():
            print(json.dumps(row | {"vs_first": round(base / row["step_ms"], 3)}), flush=True)
    lc.llama_model_free(model)


if __name__ == "__main__":
    main()
