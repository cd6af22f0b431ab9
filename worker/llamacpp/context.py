"""A llama.cpp context: one batch decode per step, a sampler chain per sequence, the KV cells of each sequence.

Owned by the engine thread alone (llama.cpp contexts are not thread-safe). The engine speaks to it in its own terms:
decode these parts, sample that output, give this sequence a chain, forget that sequence.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from typing import Any, Protocol

import llama_cpp as lc
import numpy as np
from loguru import logger

from worker.llamacpp.backend import clear_errors, gil_held, last_errors, route_ggml_log
from worker.llamacpp.draws import DrawGroups, penalized
from worker.llamacpp.model import Model, ModelLoadError
from worker.llamacpp.ubatches import plan_filler

PENALTY_LAST_N = 64
# KV cache types by their llama-server names (--cache-type-k/-v); ggml_type numbers (BF16, 30, has no constant in
# the Python binding)
_GGML_TYPES = {"f32": lc.GGML_TYPE_F32, "f16": lc.GGML_TYPE_F16, "bf16": 30, "q8_0": lc.GGML_TYPE_Q8_0,
               "q4_0": lc.GGML_TYPE_Q4_0, "q4_1": lc.GGML_TYPE_Q4_1, "iq4_nl": lc.GGML_TYPE_IQ4_NL,
               "q5_0": lc.GGML_TYPE_Q5_0, "q5_1": lc.GGML_TYPE_Q5_1}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
PROMPT_OUTPUTS = 64  # llama.cpp's default window for repetition/presence/frequency penalties

# (seq_id, tokens, first position, wants logits for the last token, wants logits for every token, how many of
# the tokens are proposals (the engine's business: logits for every token is what it needs of the context))
BatchPart = tuple[int, list[int], int, bool, bool, int]


class ChainParams(Protocol):
    """What a sampler chain is built from (the engine's SamplingParams)."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def seed(self) -> int | None: ...


# Calls that return at once, made without letting go of the GIL (see gil_held): those the engine thread makes per
# sequence per step, or per admission. Those that read a step's results wait for it inside llama.cpp: they are made
# only once the step is known done (Context.synchronize).
_sampled_token_ith = gil_held("llama_get_sampled_token_ith")
_logits_ith = gil_held("llama_get_logits_ith")
_sampler_accept = gil_held("llama_sampler_accept")
_sampler_reset = gil_held("llama_sampler_reset")
_seq_rm = gil_held("llama_memory_seq_rm")
_seq_pos_max = gil_held("llama_memory_seq_pos_max")


class _SamplerInterface(ctypes.Structure):
    """llama_sampler_i, its name returning an address (a callback's char * result would not outlive the call)."""

    _fields_ = [("name", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)), ("accept", ctypes.c_void_p),
                ("apply", ctypes.c_void_p), ("reset", ctypes.c_void_p), ("clone", ctypes.c_void_p),
                ("free", ctypes.c_void_p), ("backend_init", lc.llama_sampler_i_backend_init),
                ("backend_accept", ctypes.c_void_p), ("backend_apply", lc.llama_sampler_i_backend_apply),
                ("backend_set_input", ctypes.c_void_p), ("backend_reset", ctypes.c_void_p),
                ("copy_state", ctypes.c_void_p)]


_TOKEN_ONLY_NAME = ctypes.create_string_buffer(b"token-only")


def _token_only_apply(_smpl: Any, _ctx: Any, _gf: Any, data: Any) -> None:
    data[0].logits = None
    data[0].probs = None


# No CPU apply (a chain skips a sampler without one), no state: llama.cpp clones it by its interface alone
_TOKEN_ONLY = _SamplerInterface(
    name=_SamplerInterface._fields_[0][1](lambda _smpl: ctypes.addressof(_TOKEN_ONLY_NAME)),
    backend_init=lc.llama_sampler_i_backend_init(lambda _smpl, _buft, _n: True),
    backend_apply=lc.llama_sampler_i_backend_apply(_token_only_apply))


def token_only_sampler() -> Any:
    """A last in-graph sampler that leaves the token alone to hand over: llama.cpp copies to the host the logits
    and probabilities the chain's samplers left, after `dist` over the whole vocabulary two full rows a sequence a
    step (1 MB at a 128k vocabulary). Its graph-building callback runs Python: only where a graph is built."""
    return lc.llama_sampler_init(ctypes.cast(ctypes.pointer(_TOKEN_ONLY), ctypes.POINTER(lc.llama_sampler_i)), None)


class SamplerChain:
    """llama.cpp's usual order: penalties → top-k → top-p → min-p → temperature → dist (or greedy).

    Every stage used here has a backend (in-graph) implementation in llama.cpp, so the chain can be attached with
    llama_set_sampler; the same chain also samples on the CPU through llama_sampler_sample.
    """

    def __init__(self, params: ChainParams, n_vocab: int, *, in_graph: bool = False, hands_row: bool = False,
                 draws: DrawGroups | None = None, seq_id: int | None = None) -> None:
        """`in_graph`: built to be attached; unless it `hands_row` (its job reads the row its samplers leave), a
        token-only sampler ends it, so llama.cpp copies the token alone to the host (token_only_sampler), or a
        group's draw is the whole chain (draws.py: one set of kernels for every sequence of its shape)."""
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        add = lambda smpl: lc.llama_sampler_chain_add(self.ptr, smpl)
        grouped = in_graph and not hands_row and not penalized(params)
        self.member = draws.sampler(params, seq_id) if draws is not None and grouped else None
        if self.member is not None:
            add(self.member.ptr)
            return
        if penalized(params):
            add(lc.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, params.repetition_penalty,
                                                params.frequency_penalty, params.presence_penalty))
        if params.temperature == 0.0:
            add(lc.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(lc.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(lc.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(lc.llama_sampler_init_min_p(params.min_p, 1))
            add(lc.llama_sampler_init_temp(params.temperature))
            seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else params.seed % lc.LLAMA_DEFAULT_SEED
            add(lc.llama_sampler_init_dist(seed))
        if in_graph and not hands_row:
            add(token_only_sampler())

    def reset(self) -> None:
        """As new: penalty history cleared, the seed drawn again."""
        _sampler_reset(self.ptr)

    def close(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None


class LogitsRow:
    """An in-graph sampler that samples nothing: llama.cpp hands the sequence's logits over as they are, copying only
    that row to the host (llama_get_logits_ith reads it). A chain of one "empty" sampler: temperature 1."""

    def __init__(self) -> None:
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(self.ptr, lc.llama_sampler_init_temp(1.0))

    def close(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None


class Batch:
    """A llama_batch over numpy arrays, so a prompt chunk is filled by slicing, not per-token ctypes calls."""

    def __init__(self, capacity: int) -> None:
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base = self.seq.ctypes.data
        self._seq_ptrs = (ctypes.POINTER(lc.llama_seq_id) * capacity)(
            *(ctypes.cast(base + 4 * i, ctypes.POINTER(lc.llama_seq_id)) for i in range(capacity))
        )
        self.struct = lc.llama_batch()
        self.struct.token = self.tokens.ctypes.data_as(ctypes.POINTER(lc.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lc.llama_pos))
        self.struct.n_seq_id = self.n_seq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(ctypes.POINTER(lc.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def fill(self, parts: Iterable[BatchPart]) -> None:
        n = 0
        for seq_id, tokens, start_pos, last_logits, all_logits, _ in parts:
            k = len(tokens)
            self.tokens[n : n + k] = tokens
            self.pos[n : n + k] = np.arange(start_pos, start_pos + k, dtype=np.int32)
            self.seq[n : n + k] = seq_id
            self.logits[n : n + k] = 1 if all_logits else 0
            self.logits[n + k - 1] = 1 if last_logits or all_logits else 0
            n += k
        self.n = self.struct.n_tokens = n


class Context:
    def __init__(
        self, model: Model, *, n_ctx: int, n_seq: int, n_batch: int, threads: int, threads_batch: int | None = None,
        flash_attn: str = "auto", in_graph_sampling: bool = False, n_outputs: int | None = None,
        cache_type_k: str = "f16", cache_type_v: str = "f16", kv_unified: bool = False,
        filler: bool | None = None, group_draws: bool = True,
    ) -> None:
        """n_ctx cells: one pool (kv_unified), or n_ctx / n_seq for each of the n_seq sequences (ids 0..n_seq-1).

        `filler` (default: on a GPU, over per-slot streams): steps evened out with filler tokens where that saves
        graph evaluations (ubatches.py). Not for sliding-window or recurrent memories, where tokens past a
        sequence's end would push its window on or change its state."""
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        # Outputs (logits rows) one batch may ask for; 0 = n_batch. The engine needs one per sequence and step, and
        # sizing the output buffers and sampling graph for that keeps them small (2 x n_vocab floats per output);
        # the default leaves room for a prompt's own logprobs, PROMPT_OUTPUTS positions a step. A batch asking for
        # more aborts the process (a GGML_ASSERT), so the engine reads this bound from `n_outputs`.
        self.n_outputs = n_seq + PROMPT_OUTPUTS if n_outputs is None else n_outputs
        params.n_outputs_max = self.n_outputs
        params.n_threads = threads
        params.n_threads_batch = threads_batch or threads
        # One pool for all sequences, or a stream of cells per sequence. In the pool every token attends, masked,
        # over the cells of all sequences, and where a sequence's cells sit changes the order of llama.cpp's sums
        # (greedy text changed with what else was cached, on the CPU). In its own stream a sequence's cells are
        # where a fresh run puts them, and a prefix copied from another stream keeps its places; but llama.cpp
        # splits a step over streams into ubatches of consecutive sequence ids with equal tokens each, so a step of
        # unequal prompt chunks, or of sequences with idle ones between them, is several graph evaluations.
        params.kv_unified = kv_unified
        params.flash_attn_type = {
            "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        params.no_perf = True
        params.type_k = _GGML_TYPES[cache_type_k]
        params.type_v = _GGML_TYPES[cache_type_v]
        # llama.cpp reads a GGUF's YaRN corrections for a few architectures only; the context takes them for any
        for key in ("yarn_ext_factor", "yarn_beta_fast", "yarn_beta_slow"):
            if (value := model.meta(f"{model.info.architecture}.rope.scaling.{key}")) is not None:
                setattr(params, key, float(value))
        clear_errors()
        self.ptr = lc.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens: {last_errors()}")
        self.model = model
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.in_graph_sampling = in_graph_sampling
        self._mem = lc.llama_get_memory(self.ptr)
        self._batch = Batch(n_batch)
        self._computing = False  # a step is queued and not yet known done
        fillable = n_seq > 1 and not kv_unified and not model.recurrent and model.n_swa == 0
        self.filler = fillable and (model.offloaded if filler is None else filler)
        self._n_batch = n_batch
        self._index_map: np.ndarray | None = None  # a padded step's batch positions, by the caller's positions
        self._chains: dict[int, SamplerChain] = {}
        self._attached: dict[int, SamplerChain | LogitsRow] = {}  # each sequence's sampler in the decode graph
        self._draws = DrawGroups(model.n_vocab) if in_graph_sampling and group_draws else None
        self._reserving = False  # a sampler was attached or detached since the last decode
        self._ggml_quiet = False

    # ---- sampler chains --------------------------------------------------------------------------------------

    def use_chain(self, seq_id: int, params: ChainParams, *, reuse: bool, on_cpu: bool = False,
                  logits_row: bool = False, hands_row: bool = False) -> None:
        """Give a sequence its chain: the one it has, reset (reuse), or a new one built from params. In the decode
        graph a new chain makes llama.cpp re-reserve its buffers at the next decode; a reset one does not. An
        `on_cpu` chain stays out of the graph: it samples logits read (and masked) on the CPU.

        `logits_row` (an on_cpu chain, chains in the graph): the sequence gets an in-graph sampler that leaves its
        logits as they are, kept while it keeps asking for one. Without any, llama.cpp copies every output row's
        logits to the host at each step (`needs_raw_logits`: 4 MB at 8 streams of a 128k vocabulary) for the one
        that reads its own; with it, that row alone."""
        chain = self._chains.get(seq_id)
        row = logits_row and on_cpu and self.in_graph_sampling
        if reuse and chain is not None:
            if chain.member is not None:  # a group's draw of the same shape: the new parameters are its inputs
                chain.member.retune(params)
            chain.reset()
        else:
            self._drop_cpu_chain(seq_id)
            in_graph = self.in_graph_sampling and not on_cpu
            chain = self._chains[seq_id] = SamplerChain(params, self.model.n_vocab, in_graph=in_graph,
                                                        hands_row=hands_row, draws=self._draws, seq_id=seq_id)
            if in_graph:
                self._detach(seq_id)
                self._set_sampler(seq_id, chain.ptr)
                self._attached[seq_id] = chain
                return
        if row and not isinstance(self._attached.get(seq_id), LogitsRow):
            self._detach(seq_id)
            passthrough = LogitsRow()
            self._set_sampler(seq_id, passthrough.ptr)
            self._attached[seq_id] = passthrough
        elif not row and on_cpu:
            self._detach(seq_id)

    def retunable(self, seq_id: int, params: ChainParams) -> bool:
        """Whether the sequence's attached chain is a group's draw that draws these parameters once retuned (same
        shape, no penalties): reusing it changes no graph, where a new chain makes llama.cpp re-reserve."""
        chain = self._chains.get(seq_id)
        return (chain is not None and chain.member is not None and self._attached.get(seq_id) is chain
                and chain.member.draws(params))

    def _set_sampler(self, seq_id: int, sampler: Any) -> None:
        lc.llama_set_sampler(self.ptr, seq_id, sampler)
        self._reserving = True

    def drop_chain(self, seq_id: int) -> None:
        self._detach(seq_id)
        self._drop_cpu_chain(seq_id)

    def idle_cost(self, seq_id: int) -> bool:
        """Whether the sequence's sampler in the decode graph costs steps while it has no output: llama.cpp's own
        samplers are built into every graph on a dummy row; a group's draw leaves the sequence out."""
        attached = self._attached.get(seq_id)
        return attached is not None and not (isinstance(attached, SamplerChain) and attached.member is not None)

    def _drop_cpu_chain(self, seq_id: int) -> None:
        chain = self._chains.pop(seq_id, None)
        if chain is not None:
            if self._attached.get(seq_id) is chain:
                self._detach(seq_id)
            chain.close()

    def _detach(self, seq_id: int) -> None:
        """The sequence's in-graph sampler off the graph (llama.cpp re-reserves at the next decode)."""
        attached = self._attached.pop(seq_id, None)
        if attached is not None:
            self._set_sampler(seq_id, None)
            if isinstance(attached, LogitsRow):
                attached.close()

    # ---- steps -----------------------------------------------------------------------------------------------

    def decode(self, parts: Iterable[BatchPart]) -> int:
        """One llama_decode; 0 on success. On a GPU this only queues the step: sample() waits for it. Batch positions
        given to the methods that read a step's results are those of `parts` as given, padded or not."""
        parts = list(parts)
        filler, idle = self._filler_for(parts) if self.filler else ({}, {})
        self._index_map = None
        if filler:
            parts, ends = self._padded(parts, filler, idle)
        self._batch.fill(parts)
        self._computing = True
        if self._draws is not None:  # the sequences whose group draws are in this step's graph; after a sampler
            # was attached or detached llama.cpp re-reserves its graph in this call: sized for every member
            self._draws.active = None if self._reserving else {part[0] for part in parts if part[3] or part[4]}
            self._reserving = False
        try:
            status = int(lc.llama_decode(self.ptr, self._batch.struct))
        finally:
            if self._draws is not None:
                self._draws.active = None
        for seq_id in filler:  # filler's cells freed at once: later tokens take the places, nothing attends to them
            if not _seq_rm(self._mem, seq_id, ends[seq_id], -1):  # no memory that takes filler refuses a cut
                logger.warning(f"llama.cpp refused to free sequence {seq_id}'s filler: no more filler")
                self.filler = False
        return status

    def _filler_for(self, parts: list[BatchPart]) -> tuple[dict[int, int], dict[int, int]]:
        """The filler for each sequence (plan_filler), and the next position of each idle one among the busy."""
        busy = {part[0] for part in parts}
        if len(parts) < 2 or len(busy) < len(parts):
            return {}, {}
        lo, hi = min(busy), max(busy)
        idle = {seq: int(_seq_pos_max(self._mem, seq)) + 1 for seq in range(lo, hi + 1) if seq not in busy}
        filler = plan_filler([(seq, len(tokens), pos) for seq, tokens, pos, *_ in parts], idle,
                             room=self.n_ctx // self.n_seq, n_ubatch=self._n_batch, capacity=len(self._batch.tokens))
        return filler, idle

    def _padded(self, parts: list[BatchPart], filler: dict[int, int],
                idle: dict[int, int]) -> tuple[list[BatchPart], dict[int, int]]:
        """The step in sequence order, each sequence's filler after its part (an idle one's at its next position);
        the index map from the given parts' batch positions to the padded batch's; where each filler begins."""
        token = max(self.model.bos_token, 0)
        by_seq = {part[0]: part for part in parts}
        ends: dict[int, int] = {}
        laid: list[BatchPart] = []
        starts: dict[int, int] = {}
        at = 0
        for seq in sorted(set(by_seq) | set(filler)):
            part = by_seq.get(seq)
            if part is not None:
                starts[seq] = at
                laid.append(part)
                at += len(part[1])
                ends[seq] = part[2] + len(part[1])
            else:
                ends[seq] = idle[seq]
            if n := filler.get(seq, 0):
                laid.append((seq, [token] * n, ends[seq], False, False, 0))
                at += n
        self._index_map = np.concatenate([np.arange(starts[p[0]], starts[p[0]] + len(p[1])) for p in parts])
        return laid, ends

    def _position(self, index: int) -> int:
        """A caller's batch position in the batch llama.cpp was given."""
        return index if self._index_map is None else int(self._index_map[index])

    def synchronize(self) -> None:
        """Until the queued step is done (on a GPU, decode only queues it)."""
        lc.llama_synchronize(self.ptr)
        # llama.cpp puts a step's output rows back in batch order on the first read after it, swapping whole rows
        # (ms for large vocabularies): done here, where the GIL is let go, not in a read that keeps it
        lc.llama_get_logits(self.ptr)
        self._computing = False

    def sample(self, seq_id: int, index: int) -> int:
        """The token sampled for the output at batch position `index` (in the graph, or here on the CPU from the
        logits logits() gives, as changed there)."""
        chain = self._chains[seq_id]
        if self._attached.get(seq_id) is chain:
            # What llama_sampler_sample does with a token sampled in the graph, without its DEBUG line: each line
            # calls our log callback, which takes the GIL from inside llama.cpp (a wait for the event loop's thread
            # at every sequence's every token; 8.6 lines a step at 8 streams, measured on an H200)
            if self._computing:
                self.synchronize()
            token = _sampled_token_ith(self.ptr, self._position(index))
            if token != lc.LLAMA_TOKEN_NULL:
                _sampler_accept(chain.ptr, token)
                return int(token)
        return int(lc.llama_sampler_sample(chain.ptr, self.ptr, self._position(index)))

    def sample_candidates(self, seq_id: int, ids: np.ndarray, values: np.ndarray) -> int:
        """The token the sequence's chain picks from these candidates (token ids and their logits, read and perhaps
        narrowed by a mask on the CPU): a narrow mask makes the chain's sort short."""
        chain = self._chains[seq_id]
        candidates = np.empty(len(ids), dtype=_TOKEN_DATA)
        candidates["id"] = ids
        candidates["logit"] = values
        candidates["p"] = 0.0
        array = lc.llama_token_data_array(data=candidates.ctypes.data_as(lc.llama_token_data_p), size=len(ids),
                                          selected=-1, sorted=False)
        lc.llama_sampler_apply(chain.ptr, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        lc.llama_sampler_accept(chain.ptr, token)  # as llama_sampler_sample does: penalties see the history
        return token

    def logits(self, index: int) -> np.ndarray:
        """The logits of the output at batch position `index`, as a writable view of llama.cpp's own buffer (on a
        GPU, reading them waits for the step). Valid until the next decode."""
        if self._computing:
            self.synchronize()
        ptr = _logits_ith(self.ptr, self._position(index))
        if not ptr:
            raise RuntimeError(f"llama.cpp has no logits for batch position {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def logits_rows(self, index: int, count: int) -> np.ndarray:
        """The logits of `count` consecutive batch positions from `index`, all of which output logits: one view of
        llama.cpp's buffer, a row a position (its rows are in batch order)."""
        if self._computing:
            self.synchronize()
        first = _logits_ith(self.ptr, self._position(index))
        last = _logits_ith(self.ptr, self._position(index + count - 1))
        row_bytes = self.model.n_vocab * ctypes.sizeof(ctypes.c_float)
        if not first or not last or ctypes.addressof(last.contents) - ctypes.addressof(first.contents) != (
                count - 1) * row_bytes:
            raise RuntimeError(f"llama.cpp has no consecutive logits for batch positions {index}..{index + count - 1}")
        return np.ctypeslib.as_array(first, shape=(count, self.model.n_vocab))

    def quiet_log(self, quiet: bool) -> None:
        """ggml's own log kept out of Python (see route_ggml_log), for steps that allocate nothing."""
        if quiet != self._ggml_quiet:
            route_ggml_log(to_python=not quiet)
            self._ggml_quiet = quiet

    def warm_up(self) -> int:
        """Decodes at load pay the one-time costs (graph allocation, kernels, weights paging in). On a GPU each batch
        size uses its own kernels, loaded on first use (a lone request's first cache-hit step took 12 ms against 3
        ms the next time, H200): one sequence's batches of 1 to 8 tokens and powers of two up to the batch size,
        and one token from each of 2, 4, ... sequences, are decoded once here."""
        bos = max(self.model.bos_token, 0)
        status = self.decode([(0, [bos], 0, True, False, 0)])
        if self.model.offloaded and status == 0:
            room = min(len(self._batch.tokens), self.n_ctx // self.n_seq)  # one sequence's cells
            sizes = [size for size in (*range(2, 9), *(1 << k for k in range(4, 16))) if size <= room]
            for size in sizes:
                self.clear()
                if (status := self.decode([(0, [bos] * size, 0, True, False, 0)])) != 0:
                    break
            seqs = 2
            while status == 0 and seqs <= min(self.n_seq, len(self._batch.tokens)):
                self.clear()
                status = self.decode([(seq, [bos], 0, True, False, 0) for seq in range(seqs)])
                seqs *= 2
        self.clear()
        return status

    # ---- KV cache --------------------------------------------------------------------------------------------

    def forget(self, seq_id: int) -> None:
        """Free every KV cell of a sequence."""
        _seq_rm(self._mem, seq_id, -1, -1)

    def keep_prefix(self, seq_id: int, n: int) -> None:
        """Free a sequence's cells from position n on."""
        _seq_rm(self._mem, seq_id, n, -1)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """`dst`'s cells become `src`'s first n positions. In one pool the cells are only tagged; across streams
        llama.cpp copies whole buffers (on the device, before the next decode), then the tail is freed."""
        lc.llama_memory_seq_cp(self._mem, src, dst, -1, -1)  # across streams ~1.4 ms (H200 host): lets go
        _seq_rm(self._mem, dst, n, -1)

    def reusable(self, src: int, n: int) -> bool:
        """Whether `src`'s first n positions can seed another sequence. Recurrent and hybrid memories cannot be cut
        at a position. Sliding-window models are refused too: measured on Gemma 3 (window 512) with llama.cpp
        0.3.36, a copied prefix of 11 tokens gave the logits of cells computed in place exactly, but copied prefixes
        of ~400 and ~720 tokens gave logits off by up to 2.9 (the argmax changed)."""
        if self.model.recurrent or self.model.n_swa > 0:
            return False
        return True

    def save_sequence(self, seq_id: int) -> np.ndarray | None:
        """A sequence's state (its KV cells, their positions), copied into host memory (from the device on a GPU); None
        when llama.cpp wrote nothing. Its size per token is the model's K and V rows of all layers."""
        size = lc.llama_state_seq_get_size_ext(self.ptr, seq_id, lc.LLAMA_STATE_SEQ_FLAGS_NONE)
        if size == 0:
            return None
        buf = np.empty(size, dtype=np.uint8)
        written = lc.llama_state_seq_get_data_ext(self.ptr, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size,
                                                  seq_id, lc.LLAMA_STATE_SEQ_FLAGS_NONE)
        return buf[:written] if written else None

    def restore_sequence(self, seq_id: int, state: np.ndarray) -> bool:
        """An empty sequence takes a state save_sequence gave (of any sequence); False when llama.cpp refused it (no
        room in the sequence's cells, a state of another model), and then the sequence is left empty."""
        state = np.ascontiguousarray(state, dtype=np.uint8)
        read = lc.llama_state_seq_set_data_ext(self.ptr, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                               state.nbytes, seq_id, lc.LLAMA_STATE_SEQ_FLAGS_NONE)
        if read == 0:
            self.forget(seq_id)
            return False
        return True

    def clear(self) -> None:
        lc.llama_memory_clear(self._mem, True)

    def close(self) -> None:
        for seq_id in list(self._chains):
            self.drop_chain(seq_id)
        if self.ptr:
            lc.llama_free(self.ptr)
            self.ptr = None
