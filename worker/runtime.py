"""Loading: resolve the model reference, place it (backend, device, layers), load it, and start the engine on it.

The HTTP app calls load() off the event loop and close() at shutdown; it knows nothing of llama.cpp.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from worker.config import UNQUANTIZED_KV, Settings
from worker.engine.constraints import Grammars
from worker.engine.core import EngineCore
from worker.engine.host_cache import HostCache
from worker.engine.speculative import DraftProposer, SpecConfig
from worker.llamacpp import Context, Model, gpu_backend_name, gpu_memory_used
from worker.llamacpp.draft import DraftModel, check_draft_compatible
from worker.llamacpp.model import ModelLoadError
from worker.metrics import Metrics
from worker.models.errors import ModelResolveError
from worker.models.resolve import public_id, resolve
from worker.narration import narrate

Progress = Callable[..., None]  # (stage, value, **extra)


class BackendUnavailable(Exception):
    """The configured backend is not in this llama.cpp build (a configuration error, exit 2)."""


@dataclass(frozen=True)
class Placement:
    backend: str  # cpu, cuda, metal, ...
    device: str  # "cpu", "cuda:0", or "cuda:0,1" for a model split over GPUs
    gpu_layers: int  # llama.cpp's n_gpu_layers: -1 = all

    @property
    def offloaded(self) -> bool:
        return self.gpu_layers != 0 and self.backend != "cpu"


def placement(settings: Settings) -> Placement:
    """Where the model goes, from --backend, --device, --gpu-layers and --tensor-split."""
    gpu = gpu_backend_name()
    if settings.backend == "cpu" or (settings.backend == "auto" and gpu is None):
        return Placement("cpu", "cpu", 0)
    if gpu is None or (settings.backend != "auto" and settings.backend != gpu):
        raise BackendUnavailable(
            f"--backend {settings.backend} was asked for, but this llama.cpp build has "
            f"{'no GPU backend' if gpu is None else 'the ' + gpu + ' backend'}; use --backend auto or cpu, "
            "or reinstall llama-cpp-python with CMAKE_ARGS for that backend"
        )
    layers = -1 if settings.gpu_layers == "all" else int(settings.gpu_layers)
    split = settings.tensor_split_values
    if split and sum(1 for share in split if share > 0) > 1:  # one model across several GPUs: name them all
        return Placement(gpu, f"{gpu}:" + ",".join(str(i) for i, share in enumerate(split) if share > 0), layers)
    return Placement(gpu, f"{gpu}:{settings.device}", layers)


def flash_attn_policy(setting: str, *, offloaded: bool, quantized_v: bool = False) -> str:
    # auto = on with the GPU; off on the CPU, where llama.cpp's flash attention changed SmolLM2's greedy output
    # ("Hello! I'sure I'm not…" instead of "Hello! I'm here to help…", the output without it and llama-cpp-python's);
    # on wherever the V cache is quantized, which llama.cpp runs only with it.
    if setting != "auto":
        return setting
    return "on" if offloaded or quantized_v else "off"


@dataclass
class Runtime:
    """A loaded model and the engine serving it."""

    model: Model
    engine: EngineCore
    placement: Placement
    vram_bytes: int  # what this worker put on its GPU: weights, KV cache and compute buffers (0 on the CPU)
    load_s: float
    draft: DraftModel | None = None  # speculative decoding's draft model (--spec-type draft)

    def close(self) -> None:
        self.engine.close()  # its thread is done with the draft too
        if self.draft is not None:
            self.draft.close()
        self.model.close()
        st = self.engine.stats
        if st.steps:
            per_step = lambda s: s / st.steps * 1000
            narrate("engine_stats", f"{st.steps} decode steps, {per_step(st.step_s):.2f} ms each: "
                    f"{per_step(st.queue_s):.2f} ms queueing them (llama_decode), {per_step(st.wait_s):.2f} ms "
                    f"waiting for them, {per_step(st.sample_s):.2f} ms reading and sampling their results.",
                    actor="engine", steps=st.steps, step_ms=round(per_step(st.step_s), 3),
                    queue_ms=round(per_step(st.queue_s), 3), wait_ms=round(per_step(st.wait_s), 3),
                    sample_ms=round(per_step(st.sample_s), 3),
                    llama_share=round((st.queue_s + st.wait_s) / st.step_s, 3))


def load(settings: Settings, where: Placement, metrics: Metrics, loop: asyncio.AbstractEventLoop,
         progress: Progress) -> Runtime:
    """Resolve, load and warm up the model, and start its engine (runs off the event loop)."""
    s = settings
    t0 = time.perf_counter()
    progress("resolve", 0.0)
    resolved = resolve(s.model, cache_dir=s.cache_dir, quantize=s.quantize)
    narrate("model_resolve", f"Model {resolved.ref} resolves to {resolved.path}.", target=resolved.ref,
            path=str(resolved.path), format=resolved.format)
    vram_before = gpu_memory_used()

    last = [-1.0]

    def on_weights(value: float) -> None:  # llama.cpp calls this per tensor: pass on whole percents only
        if value - last[0] >= 0.01 or value >= 1.0:
            last[0] = value
            progress("load_weights", 0.05 + 0.85 * value)

    progress("load_weights", 0.05)
    model = Model.load(resolved.path, ref=resolved.ref, fmt=resolved.format, gpu_layers=where.gpu_layers,
                       main_gpu=s.device, tensor_split=s.tensor_split_values, progress=on_weights)
    info = model.info
    narrate("gguf_metadata_loaded", f"{info.architecture} model, {info.quantization}, "
            f"{info.n_params / 1e6:.0f}M parameters, trained on {info.n_ctx_train} tokens of context.",
            target=resolved.ref, architecture=info.architecture, quantization=info.quantization,
            n_params=info.n_params, n_ctx_train=info.n_ctx_train, n_layers=info.n_layers,
            has_chat_template=info.chat_template is not None)
    narrate("gguf_tokenizer_extracted", f"Tokenizer with {info.n_vocab} tokens.", target=resolved.ref,
            vocab_size=info.n_vocab, bos=info.bos, eos=info.eos, unk=info.unk)
    try:
        progress("warmup", 0.9)
        model.prepare_tokenizer()
        ctx_size = s.ctx_size or min(info.n_ctx_train or 4096, 4096)
        in_graph = s.backend_sampling == "on" or (s.backend_sampling == "auto" and where.offloaded)
        prefix_cache = s.prefix_cache == "on"
        ctx = Context(model, n_ctx=ctx_size * s.parallel, n_seq=s.parallel, n_batch=s.batch_size,
                      threads=s.threads, threads_batch=s.threads_batch,
                      flash_attn=flash_attn_policy(s.flash_attn, offloaded=where.offloaded,
                                                   quantized_v=s.cache_type_v not in UNQUANTIZED_KV),
                      cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
                      in_graph_sampling=in_graph,
                      kv_unified=s.kv_unified == "on")
        grammars = Grammars(model.guidance_tokenizer, lambda token: model.piece(token, special=True), info.n_vocab)
        draft = None
        try:
            if (status := ctx.warm_up()) != 0:
                logger.warning(f"warm-up decode returned {status}")
            if s.spec_type == "draft":
                progress("load_draft", 0.95)
                draft = load_draft(s, where, model, ctx_size)
            speculation = SpecConfig(n_max=s.spec_draft_n_max, n_min=s.spec_draft_n_min, max_load=s.spec_max_load,
                                     fixed_length=model.offloaded)
            engine = EngineCore(ctx, model, ctx_size=ctx_size, parallel=s.parallel, max_queue=s.max_queue,
                                batch_size=s.batch_size, in_graph_sampling=in_graph, offloaded=model.offloaded,
                                prefix_cache=prefix_cache, metrics=metrics, grammars=grammars,
                                speculation=speculation if s.spec_type != "none" else None,
                                proposer=DraftProposer(draft) if draft is not None else None,
                                host_cache=host_cache(s, offloaded=model.offloaded) if prefix_cache else None,
                                split_prompt_steps=model.offloaded and s.kv_unified == "off" and s.parallel > 1,
                                profile_path=str(s.profile_dir / "scheduler.prof") if s.profile_dir else None)
        except BaseException:
            ctx.close()
            if draft is not None:
                draft.close()
            raise
        engine.start(loop)
    except BaseException:
        model.close()
        raise
    vram_after = gpu_memory_used()
    vram = sum(max(0, vram_after.get(d, 0) - vram_before.get(d, 0)) for d in vram_after)
    load_s = time.perf_counter() - t0
    _bind_metrics(metrics, engine, model, where, load_s, s.served_model_name or public_id(resolved.ref))
    narrate("model_load_complete", f"Model ready on {where.device} in {load_s:.2f} s: "
            f"{s.parallel} slots of {ctx_size} tokens, prefix cache {s.prefix_cache}.", target=resolved.ref,
            duration_ms=round(load_s * 1000, 1), backend=where.backend, device=where.device,
            slots=s.parallel, ctx_size=ctx_size, prefix_cache=prefix_cache,
            cache_ram_mib=cache_ram_mib(s, offloaded=model.offloaded),
            backend_sampling=in_graph, vram_bytes=vram, threads=s.threads, threads_batch=s.threads_batch,
            cute="Ready to tell stories!")
    return Runtime(model, engine, where, vram, load_s, draft)


def cache_ram_mib(s: Settings, *, offloaded: bool) -> int:
    """--cache-ram, its default decided by where the model runs (see the setting)."""
    if s.cache_ram is not None:
        return s.cache_ram
    return 0 if offloaded else 8192


def host_cache(s: Settings, *, offloaded: bool = False) -> HostCache | None:
    """The prefix cache's host-memory tier of --cache-ram (MiB; -1: no limit, 0: none)."""
    mib = cache_ram_mib(s, offloaded=offloaded)
    if mib == 0:
        return None
    return HostCache(None if mib == -1 else mib * 2**20)


def load_draft(s: Settings, where: Placement, target: Model, ctx_size: int) -> DraftModel:
    """The draft model of --spec-type draft, on the target's device, its vocabulary checked against the target's
    (DraftMismatch: exit 2), with a context of one sequence per slot."""
    assert s.spec_draft_model is not None
    layers = where.gpu_layers if s.spec_draft_gpu_layers is None or not where.offloaded else (
        -1 if s.spec_draft_gpu_layers == "all" else int(s.spec_draft_gpu_layers))
    try:
        resolved = resolve(s.spec_draft_model, cache_dir=s.cache_dir, quantize=s.quantize)
        model = Model.load(resolved.path, ref=resolved.ref, fmt=resolved.format, gpu_layers=layers,
                           main_gpu=s.device)
    except (ModelResolveError, ModelLoadError) as exc:  # the same exit (3), saying which of the two models it was
        raise type(exc)(f"the draft model (--spec-draft-model): {exc}") from None
    try:
        check_draft_compatible(target, model)
        n_ctx_seq = min(s.spec_draft_ctx_size or ctx_size, ctx_size)  # more than the target's would never be used
        draft = DraftModel(model, n_ctx_seq=n_ctx_seq, n_seq=s.parallel, n_batch=s.batch_size, threads=s.threads,
                           threads_batch=s.threads_batch,
                           flash_attn=flash_attn_policy(s.flash_attn, offloaded=where.offloaded))
    except BaseException:
        model.close()
        raise
    narrate("draft_model_loaded", f"Draft model {resolved.ref} ({model.info.architecture}, "
            f"{model.info.n_params / 1e6:.0f}M parameters) proposes tokens: {n_ctx_seq} tokens of context per slot.",
            target=resolved.ref, path=str(resolved.path), architecture=model.info.architecture,
            n_params=model.info.n_params, ctx_size=n_ctx_seq, gpu_layers=layers)
    return draft


def _bind_metrics(m: Metrics, engine: EngineCore, model: Model, where: Placement, load_s: float,
                  model_id: str) -> None:
    info = model.info
    m.bind_engine(slots=engine.n_slots, running=lambda: engine.busy, waiting=lambda: engine.waiting,
                  kv_usage=engine.kv_usage, kv_cells=engine.kv_cells, kv_cells_total=engine.kv_cells_total)
    m.bind_device_memory(gpu_memory_used)
    if (ram := engine.scheduler.host_cache) is not None:
        m.bind_host_cache(lambda: (ram.bytes, len(ram)))
    m.load_seconds.set(load_s)
    m.model_size.set(info.size_bytes)
    # /metrics is open: the model's public id, never the host path of its file
    labels: dict[str, Any] = {"model": model_id, "architecture": info.architecture,
                              "quantization": info.quantization, "backend": where.backend, "device": where.device}
    m.model_info.info(labels)
