"""Speculative decoding (ngram, or a draft model) against plain decoding, the engine in-process, on a workload that
copies from its prompt and on one that does not; alternated rounds, so a busy neighbour slows both alike.

    python -m bench.speculative                                   # CPU, the embedded model, ngram
    python -m bench.speculative --model m.gguf --gpu-layers 999 --streams 1,8,32
    python -m bench.speculative --model m.gguf --gpu-layers 999 --spec-type draft --draft-model m.gguf --gate off
                                                                  # a self-draft, every step: the ceiling
Rows (JSON, one a line): plain_tps, <spec-type>_tps, speedup, same_text, acceptance, plain_ms_per_step,
<spec-type>_ms_per_step, <spec-type>_tokens_per_step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from worker.engine.core import EngineCore, StepStats
from worker.engine.outputs import Failed, Finished, Job, Output, TokenText
from worker.engine.sampling import SamplingParams
from worker.engine.speculative import DraftProposer, SpecConfig
from worker.llamacpp import Context, Model
from worker.llamacpp.draft import DraftModel, check_draft_compatible
from worker.models.resolve import embedded_model_path

PASSAGE = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
           "members agreed to increase funding for the library by ten percent, to repair the roof of the town hall "
           "before the winter, and to hire two new teachers for the primary school. The proposal to build a new "
           "parking lot near the station was postponed until the spring, when a traffic study will be available.")
COPY = ("<|im_start|>user\nRepeat the following text exactly, word for word:\n\n" + PASSAGE +
        "<|im_end|>\n<|im_start|>assistant\n")
FREE = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


def build(model: Model, streams: int, spec: SpecConfig | None, draft: DraftModel | None = None) -> EngineCore:
    ctx = Context(model, n_ctx=1024 * streams, n_seq=streams, n_batch=512, threads=2 if not model.offloaded else 4,
                  flash_attn="on" if model.offloaded else "off", in_graph_sampling=model.offloaded)
    assert ctx.warm_up() == 0
    return EngineCore(ctx, model, ctx_size=1024, parallel=streams, max_queue=64, batch_size=512,
                      in_graph_sampling=model.offloaded, offloaded=model.offloaded, prefix_cache=False,
                      speculation=spec, proposer=DraftProposer(draft) if draft is not None else None)


def load_draft(path: str, target: Model, streams: int, gpu_layers: int) -> DraftModel:
    model = Model.load(Path(path), ref=path, fmt="gguf", gpu_layers=gpu_layers)
    check_draft_compatible(target, model)
    return DraftModel(model, n_ctx_seq=1024, n_seq=streams, n_batch=512, threads=2 if not model.offloaded else 4,
                      flash_attn="on" if model.offloaded else "off")


async def run_round(engine: EngineCore, model: Model, prompt: str, streams: int, tokens: int, tag: str,
                    params: SamplingParams) -> tuple[list[Finished], list[str]]:
    loop = asyncio.get_running_loop()
    futures = []
    for i in range(streams):
        fut: asyncio.Future = loop.create_future()
        out: list[Output] = []

        def deliver(outputs, out=out, fut=fut):
            out.extend(outputs)
            if isinstance(out[-1], Failed) and not fut.done():
                fut.set_exception(RuntimeError(f"a job failed: {out[-1]}"))
            elif isinstance(out[-1], Finished) and not fut.done():
                fut.set_result(out)

        engine.submit(Job(job_id=f"{tag}-{i}", prompt_tokens=model.prompt_tokens(prompt), params=params,
                          max_tokens=tokens, deliver=deliver))
        futures.append(fut)
    outs = [await f for f in futures]
    return [o[-1] for o in outs], ["".join(x.text for x in o if isinstance(x, TokenText)) for o in outs]


async def main_async(args: argparse.Namespace) -> list[dict]:
    model = Model.load(Path(args.model) if args.model else embedded_model_path(), ref="bench", fmt="gguf",
                       gpu_layers=args.gpu_layers)
    fixed_length = model.offloaded if args.fixed_length is None else args.fixed_length == "on"
    # one speculating engine per shadow_hits value, all alternated with the plain one in each round
    specs = {(args.spec_type if len(args.shadow_hits) == 1 else f"{args.spec_type}-h{hits}"): SpecConfig(
        n_max=args.n_max, max_load=args.max_load, gate=args.gate == "on", fixed_length=fixed_length,
        shadow_hits=hits) for hits in args.shadow_hits}
    params = SamplingParams(temperature=0)
    rows = []
    try:
        for streams in [int(s) for s in args.streams.split(",")]:
            draft = load_draft(args.draft_model, model, streams, args.gpu_layers) if args.spec_type == "draft" else None
            engines = {"plain": build(model, streams, None)} | {
                kind: build(model, streams, spec, draft) for kind, spec in specs.items()}
            for e in engines.values():
                e.start(asyncio.get_running_loop())
            try:
                for name, prompt in (("copy", COPY), ("free", FREE)):
                    for row in await compare(engines, model, name, prompt, streams, params, args):
                        print(json.dumps(row), flush=True)
                        rows.append(row)
            finally:
                for e in engines.values():
                    e.close()
                if draft is not None:
                    draft.close()
    finally:
        model.close()
    return rows


async def compare(engines: dict[str, EngineCore], model: Model, name: str, prompt: str, streams: int,
                  params: SamplingParams, args: argparse.Namespace) -> list[dict]:
    """Rounds of every engine in turn; a row for each speculating engine against the plain one."""
    tps: dict[str, list[float]] = {kind: [] for kind in engines}
    texts: dict[str, list[str]] = {}
    rate: dict[str, list[float]] = {kind: [] for kind in engines}
    step_ms: dict[str, list[float]] = {kind: [] for kind in engines}
    split: dict[str, dict[float, dict[str, float]]] = {kind: {} for kind in engines}  # ms a step by part
    for r in range(args.rounds):
        for kind, eng in engines.items():
            eng.stats = StepStats()
            ends, texts[kind] = await run_round(eng, model, prompt, streams, args.tokens,
                                                f"{kind}{streams}{name}{r}", params)
            tps[kind].append(sum(e.tokens_out for e in ends) / max(e.decode_s for e in ends))
            st = eng.stats
            step_ms[kind].append(st.step_s / max(st.steps, 1) * 1000)
            parts = {part: getattr(st, f"{part}_s") / max(st.steps, 1) * 1000
                     for part in ("queue", "overlap", "wait", "sample")}
            parts["rest"] = step_ms[kind][-1] - sum(parts.values())  # planning, proposing, the updates after
            split[kind][step_ms[kind][-1]] = {part: round(ms, 3) for part, ms in parts.items()}
            rate[kind] += [e.acceptance_rate for e in ends if e.acceptance_rate is not None]
    rows = []
    for spec_kind in [kind for kind in engines if kind != "plain"]:
        row = {"streams": streams, "workload": name, "plain_tps": round(max(tps["plain"]), 1),
               f"{spec_kind}_tps": round(max(tps[spec_kind]), 1),
               "speedup": round(max(tps[spec_kind]) / max(tps["plain"]), 3),
               "same_text": texts["plain"] == texts[spec_kind],
               "acceptance": round(statistics.mean(rate[spec_kind]), 3) if rate[spec_kind] else None,
               "plain_ms_per_step": round(min(step_ms["plain"]), 3),
               f"{spec_kind}_ms_per_step": round(min(step_ms[spec_kind]), 3),
               f"{spec_kind}_tokens_per_step": round(max(tps[spec_kind]) * min(step_ms[spec_kind]) / 1000 / streams, 2),
               # where the fastest round's steps went: llama_decode, the engine's work while the step computes,
               # waiting for the GPU, sampling after, the rest
               "plain_ms_split": split["plain"][min(step_ms["plain"])],
               f"{spec_kind}_ms_split": split[spec_kind][min(step_ms[spec_kind])]}
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a GGUF file (default: the embedded model)")
    p.add_argument("--gpu-layers", type=int, default=0)
    p.add_argument("--streams", default="1")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-max", type=int, default=7)
    p.add_argument("--max-load", type=int, default=4)
    p.add_argument("--fixed-length", choices=["on", "off"], help="default: on where the model is offloaded")
    p.add_argument("--spec-type", choices=("ngram", "draft"), default="ngram")
    p.add_argument("--draft-model", help="the draft GGUF of --spec-type draft (the same file: a self-draft)")
    p.add_argument("--gate", choices=("on", "off"), default="on",
                   help="off: speculate at every step whatever it costs (a proposer's ceiling)")
    p.add_argument("--shadow-hits", type=lambda v: [int(x) for x in v.split(",")], default=[SpecConfig.shadow_hits],
                   help="right shadow guesses in a row before a stretch; several (1,2): an engine each, alternated")
    p.add_argument("--out")
    args = p.parse_args()
    if (args.spec_type == "draft") != (args.draft_model is not None):
        p.error("--spec-type draft and --draft-model go together")
    rows = asyncio.run(main_async(args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
