"""Where a CPU-sampled token's time goes on a large vocabulary: reading the logits, the logprobs, the allowed tokens
of a wide constraint, llama.cpp's chain ("sample", over the whole vocabulary) and the engine's numpy sampler
("numpy", over the allowed tokens). One sequence, the step repeated.

    python -m bench.cpu_sampling_probe --model m.gguf --gpu-layers 999"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from worker.engine.constraints import Grammars
from worker.engine.cpu_sampling import CpuSampler
from worker.engine.logprobs import Ranked
from worker.engine.outputs import Constraint
from worker.engine.sampling import SamplingParams
from worker.llamacpp import Context, Model
from worker.models.resolve import embedded_model_path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--n", type=int, default=50)
    args = p.parse_args()
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="probe", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    ctx = Context(model, n_ctx=4096, n_seq=2, n_batch=512, threads=2, in_graph_sampling=model.offloaded,
                  flash_attn="on" if model.offloaded else "off")
    grammars = Grammars(model.guidance_tokenizer, lambda t: model.piece(t, special=True), model.n_vocab)
    guide = grammars.guide(Constraint("regex", r"[^\n]{4000}"))
    prompt = model.prompt_tokens("Write a story.")
    for name, params in (("greedy", SamplingParams(temperature=0)), ("t0.8", SamplingParams(temperature=0.8)),
                         ("t0.8 top_k40", SamplingParams(temperature=0.8, top_k=40)),
                         ("t0.8 top_p0.95", SamplingParams(temperature=0.8, top_p=0.95))):
        ctx.clear()
        ctx.use_chain(0, params, reuse=False, on_cpu=True)
        assert ctx.decode([(0, prompt, 0, True, False, 0)]) == 0
        sampler = CpuSampler(params)
        pos, token, t = len(prompt), 0, dict.fromkeys(("decode+read", "ranked", "allowed", "sample", "numpy"), 0.0)
        index = len(prompt) - 1
        for _ in range(args.n):
            t0 = time.perf_counter()
            logits = ctx.logits(index)
            _ = float(logits[0])
            t1 = time.perf_counter()
            ranked = Ranked(logits, 5)
            t2 = time.perf_counter()
            allowed = guide.allowed()
            t3 = time.perf_counter()
            token = ctx.sample(0, index)
            t4 = time.perf_counter()
            token = sampler.sample(logits, allowed)
            t["numpy"] += time.perf_counter() - t4
            ranked.of(logits, token, model.piece)
            guide.consume(token)
            t["ranked"] += t2 - t1
            t["allowed"] += t3 - t2
            t["sample"] += t4 - t3
            t5 = time.perf_counter()
            assert ctx.decode([(0, [token], pos, True, False, 0)]) == 0
            ctx.logits(0)
            t["decode+read"] += time.perf_counter() - t5 + (t1 - t0)
            pos, index = pos + 1, 0
        print(name, {k: round(v / args.n * 1000, 3) for k, v in t.items()}, "ms per token")


if __name__ == "__main__":
    main()
