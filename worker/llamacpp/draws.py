"""Draws of many sequences built as one set of graph operations.

llama.cpp builds each attached sampler chain's operations for its own sequence: with top-k, top-p and a
temperature that is some 27 small kernels a sequence a step (a sort over the whole vocabulary among them), 860 at
32 streams. A `GroupDraw` sampler is the whole in-graph chain of one sequence. Sequences whose chains have the same
shape (greedy; a draw over the whole vocabulary; a draw over the top k) share a `DrawGroup`: the first of them that
llama.cpp asks to build its part builds the draw of every member's row at once, gathered into one matrix, and each
member hands over its own element of the result. Temperature, top-p, min-p and the uniform draw are per-member
inputs, so members differ in those and still share one set of kernels.

Top-k over a large vocabulary goes in stages of blocks that fit one sorting kernel (ggml's bitonic argsort takes
rows of up to 1024): the best k of each block, then the best k of those.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as lc
import numpy as np

_F32, _I32 = 0, 26  # ggml_type
_SORT_DESC = 1
_MAX_SORT_COLS = 1024  # the bitonic argsort's row limit (a row in shared memory)
# Rows longer than this are cut into blocks (the best k of each) before the last sort; shorter ones are sorted at
# once (over 1024, by ggml's CUDA sort for long rows). A module setting for bench/handover_probe.py.
STAGE_ABOVE = _MAX_SORT_COLS
MAX_TOP_K = 128  # larger k keep llama.cpp's own top-k sampler
# The largest uniform number: u x the summed weights stays below the sum by far more than float32's rounding, so a
# draw never lands past the last kept candidate (at most 1e-6 of the mass, the tail's, is never drawn)
U_MAX = 1.0 - 2.0**-20

_p, _i64, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_lib: Any = None


def _ggml() -> Any:
    """ggml's graph-building functions, found through the loaded libllama (it links ggml-base); the GIL kept:
    they only build tensors, and run inside llama_decode's own call into Python."""
    global _lib
    if _lib is None:
        lib = ctypes.PyDLL(lc.llama_cpp._lib._name)
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "ggml_reshape_1d": (_p, [_p, _p, _i64]),
            "ggml_reshape_2d": (_p, [_p, _p, _i64, _i64]),
            "ggml_reshape_3d": (_p, [_p, _p, _i64, _i64, _i64]),
            "ggml_view_1d": (_p, [_p, _p, _i64, ctypes.c_size_t]),
            "ggml_view_2d": (_p, [_p, _p, _i64, _i64, ctypes.c_size_t, ctypes.c_size_t]),
            "ggml_cont": (_p, [_p, _p]),
            "ggml_new_tensor_1d": (_p, [_p, ctypes.c_int, _i64]),
            "ggml_new_tensor_2d": (_p, [_p, ctypes.c_int, _i64, _i64]),
            "ggml_set_input": (None, [_p]),
            "ggml_get_rows": (_p, [_p, _p, _p]),
            "ggml_argsort_top_k": (_p, [_p, _p, ctypes.c_int]),
            "ggml_argmax": (_p, [_p, _p]),
            "ggml_cast": (_p, [_p, _p, ctypes.c_int]),
            "ggml_add": (_p, [_p, _p, _p]),
            "ggml_sub": (_p, [_p, _p, _p]),
            "ggml_mul": (_p, [_p, _p, _p]),
            "ggml_arange": (_p, [_p, _f, _f, _f]),
            "ggml_soft_max": (_p, [_p, _p]),
            "ggml_soft_max_ext": (_p, [_p, _p, _p, _f, _f]),
            "ggml_cumsum": (_p, [_p, _p]),
            "ggml_scale": (_p, [_p, _p, _f]),
            "ggml_scale_bias": (_p, [_p, _p, _f, _f]),
            "ggml_step": (_p, [_p, _p]),
            "ggml_log": (_p, [_p, _p]),
            "ggml_sum_rows": (_p, [_p, _p]),
            "ggml_clamp": (_p, [_p, _p, _f, _f]),
            "ggml_backend_tensor_set": (None, [_p, _p, ctypes.c_size_t, ctypes.c_size_t]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _lib = lib
    return _lib


class _Tensor(ctypes.Structure):
    """The head of struct ggml_tensor, as far as view_offs (ggml.h)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", _p), ("ne", _i64 * 4), ("nb", ctypes.c_size_t * 4),
                ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", _p * 10), ("view_src", _p), ("view_offs", ctypes.c_size_t)]


def _tensor(ptr: int) -> _Tensor:
    return _Tensor.from_address(ptr)


def penalized(params: Any) -> bool:
    """Penalties need a history of tokens: llama.cpp's own sampler, never a group's draw."""
    return bool(params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0)


def block_size(n: int, k: int) -> int | None:
    """The largest block that divides n, fits one sort and leaves the next stage at most half as long."""
    for size in range(min(n, _MAX_SORT_COLS), max(4 * k, 64) - 1, -1):
        if n % size == 0:
            return size
    return None


@dataclass(frozen=True)
class DrawShape:
    """What the graph of a group's draw depends on; the rest (temperature, p, the draw) are its inputs."""

    kind: str  # "greedy", "full" (the whole vocabulary), "top_k"
    top_k: int = 0
    top_p: bool = False
    min_p: bool = False

    @staticmethod
    def of(params: Any, n_vocab: int) -> DrawShape | None:
        """The shape for sampling params, None where a group cannot draw them as llama.cpp's chain would."""
        if params.temperature == 0.0:
            return DrawShape("greedy")
        if 0 < params.top_k < min(n_vocab, MAX_TOP_K + 1):
            return DrawShape("top_k", params.top_k, params.top_p < 1.0, params.min_p > 0.0)
        if params.top_k <= 0 or params.top_k >= n_vocab:
            if params.top_p >= 1.0 and params.min_p <= 0.0:
                return DrawShape("full")
        return None  # top-p or min-p over the whole vocabulary: llama.cpp's sort


@dataclass
class _Build:
    """One graph build's share of a group: its inputs and the tokens every member's view reads."""

    capacity: int
    rows: Any = None  # I32 [capacity]: the logits row of each slot
    params: Any = None  # F32 [capacity, 4]: u, 1/temperature, top_p, min_p by slot
    tokens: Any = None  # I32 [capacity]
    slots: int = 0
    row_of: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    params_of: np.ndarray = field(default_factory=lambda: np.zeros((4, 0), np.float32))
    asked: set[int] = field(default_factory=set)  # slots whose inputs were asked for in this step


class DrawGroup:
    """The sequences of one context whose chains have one DrawShape."""

    def __init__(self, shape: DrawShape) -> None:
        self.shape = shape
        self.build: _Build | None = None
        self.rng = np.random.default_rng()
        self.resets: set[int] = set()  # members reset since the last build began: the next build's size

    def reset(self, member: GroupDraw) -> None:
        if self.build is not None:  # a new graph is being built: the last one's tensors are gone
            self.build, self.resets = None, set()
        self.resets.add(member.key)

    def forget(self, member: GroupDraw) -> None:
        self.resets.discard(member.key)


def _build_draw(g: Any, ctx: int, x: int, n: int, m: int, shape: DrawShape, params: int | None) -> Any:
    """The tokens [m] (I32) drawn from logits x [n, m] by shape; params [m, 4] as in _Build."""
    if shape.kind == "greedy":
        return g.ggml_argmax(ctx, x)
    assert params is not None
    column = lambda i: g.ggml_view_2d(ctx, params, 1, m, 4, i * m * 4)  # [1, m]
    u, inv_t, top_p, min_p = (column(i) for i in range(4))
    if shape.kind == "full":
        values, ids, k = x, None, n
    else:
        values, ids, k = _top_k(g, ctx, x, n, m, shape.top_k)
    keep = None
    if shape.top_p or shape.min_p:
        probs = g.ggml_soft_max(ctx, values)  # at temperature 1, as llama.cpp's chain truncates
        if shape.top_p:  # kept while the mass before a candidate is below p: a prefix, the first always in
            before = g.ggml_sub(ctx, g.ggml_cumsum(ctx, probs), probs)
            keep = g.ggml_step(ctx, g.ggml_scale(ctx, g.ggml_sub(ctx, before, top_p), -1.0))
        if shape.min_p:  # at least min_p times the most likely one's probability
            first = g.ggml_cont(ctx, g.ggml_view_2d(ctx, probs, 1, m, k * 4, 0))
            floor = g.ggml_step(ctx, g.ggml_sub(ctx, probs, g.ggml_mul(ctx, first, min_p)))
            keep = floor if keep is None else g.ggml_mul(ctx, keep, floor)
    scaled = g.ggml_mul(ctx, values, inv_t)
    mask = g.ggml_log(ctx, keep) if keep is not None else None
    weights = g.ggml_soft_max_ext(ctx, scaled, mask, 1.0, 0.0) if mask else g.ggml_soft_max(ctx, scaled)
    cdf = g.ggml_cumsum(ctx, weights)
    total = g.ggml_cont(ctx, g.ggml_view_2d(ctx, cdf, 1, m, k * 4, (k - 1) * 4))
    threshold = g.ggml_mul(ctx, u, total)  # u scaled by the sum as summed: never past the last kept candidate
    above = g.ggml_sum_rows(ctx, g.ggml_step(ctx, g.ggml_sub(ctx, cdf, threshold)))
    index = g.ggml_clamp(ctx, g.ggml_scale_bias(ctx, above, -1.0, float(k)), 0.0, float(k - 1))
    index = g.ggml_cast(ctx, index, _I32)  # [1, m]
    if ids is None:
        return g.ggml_reshape_1d(ctx, index, m)
    token = g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, ids, 1, k, m), index)  # [1, 1, m]
    return g.ggml_reshape_1d(ctx, g.ggml_cast(ctx, token, _I32), m)


def _top_k(g: Any, ctx: int, x: Any, n: int, m: int, k: int) -> tuple[Any, Any, int]:
    """The k largest of each column of x [n, m], sorted: (values [k, m], their rows as F32 [k, m], k)."""
    ids = None
    while n > STAGE_ABOVE:
        size = block_size(n, k)
        if size is None:
            break  # one sort of the whole row (ggml's CUDA sort for long rows)
        blocks = n // size
        rows = g.ggml_reshape_2d(ctx, x, size, blocks * m)
        best = g.ggml_argsort_top_k(ctx, rows, k)  # [k, blocks * m], a view
        x = g.ggml_reshape_2d(ctx, g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, rows, 1, size, blocks * m), best),
                              k * blocks, m)
        if ids is None:  # a block's index plus the block's first row
            local = g.ggml_reshape_3d(ctx, g.ggml_cast(ctx, best, _F32), k, blocks, m)
            starts = g.ggml_reshape_3d(ctx, g.ggml_arange(ctx, 0.0, float(n), float(size)), 1, blocks, 1)
            ids = g.ggml_add(ctx, local, starts)
        else:
            ids = g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, ids, 1, size, blocks * m), best)
        ids = g.ggml_reshape_2d(ctx, ids, k * blocks, m)
        n = k * blocks
    best = g.ggml_argsort_top_k(ctx, x, k)  # [k, m]
    values = g.ggml_reshape_2d(ctx, g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, x, 1, n, m), best), k, m)
    if ids is None:
        ids = g.ggml_cast(ctx, best, _F32)
    else:
        ids = g.ggml_reshape_2d(ctx, g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, ids, 1, n, m), best), k, m)
    return values, ids, k


def draw_on_cpu(logits: np.ndarray, shape: DrawShape, inputs: np.ndarray) -> int:
    """The index into logits that the graph's draw picks for them with inputs (u, 1/temperature, top_p, min_p):
    the same steps in numpy, for a chain llama.cpp runs on the CPU and as the tests' reference."""
    if shape.kind == "greedy":
        return int(np.argmax(logits))
    u, inv_t, top_p, min_p = (float(x) for x in inputs)
    # the whole vocabulary is drawn from in its own order, as llama.cpp's dist does; top k sorted
    order = np.argsort(-logits, kind="stable")[:shape.top_k] if shape.kind == "top_k" else np.arange(len(logits))
    values = logits[order].astype(np.float64)
    keep = np.ones(len(values), bool)
    if shape.top_p or shape.min_p:
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        if shape.top_p:
            keep &= np.cumsum(probs) - probs < top_p
        if shape.min_p:
            keep &= probs > min_p * probs[0]
    weights = np.where(keep, np.exp((values - values.max()) * inv_t), 0.0)
    cdf = np.cumsum(weights / weights.sum())
    index = min(max(len(cdf) - int(np.count_nonzero(cdf > u * cdf[-1])), 0), int(np.flatnonzero(keep)[-1]))
    return int(order[index])


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class _Interface(ctypes.Structure):
    """llama_sampler_i, its name returning an address (a callback's char * result would not outlive the call)."""

    _fields_ = [("name", ctypes.CFUNCTYPE(_p, _p)), ("accept", _p), ("apply", lc.llama_sampler_i_apply),
                ("reset", lc.llama_sampler_i_reset), ("clone", _p), ("free", lc.llama_sampler_i_free),
                ("backend_init", lc.llama_sampler_i_backend_init), ("backend_accept", _p),
                ("backend_apply", lc.llama_sampler_i_backend_apply),
                ("backend_set_input", lc.llama_sampler_i_backend_set_input),
                ("backend_reset", lc.llama_sampler_i_backend_reset), ("copy_state", _p)]


_members: dict[int, GroupDraw] = {}  # by the llama_sampler's ctx value
_next_key = [1]


def _member(smpl: Any) -> GroupDraw:
    return _members[smpl[0].ctx]


def _apply(smpl: Any, cur_p: Any) -> None:
    """On the CPU: llama.cpp's sampling of a chain it did not take into the graph (not reached while attached)."""
    member, array = _member(smpl), cur_p[0]
    buffer = (ctypes.c_char * (array.size * _TOKEN_DATA.itemsize)).from_address(ctypes.addressof(array.data.contents))
    candidates = np.frombuffer(buffer, dtype=_TOKEN_DATA)
    inputs = member.inputs.copy()
    inputs[0] = min(member.rng.random(), U_MAX)
    array.selected = draw_on_cpu(candidates["logit"].copy(), member.group.shape, inputs)


def _reset(smpl: Any) -> None:
    _member(smpl).reseed()


def _free(smpl: Any) -> None:
    member = _members.pop(smpl[0].ctx, None)
    if member is not None:
        member.group.forget(member)


def _backend_apply(smpl: Any, ctx: Any, _gf: Any, data: Any) -> None:
    _member(smpl).apply(ctx, data[0])


def _backend_set_input(smpl: Any) -> None:
    _member(smpl).set_input()


def _backend_reset(smpl: Any) -> None:
    member = _member(smpl)
    member.slot, member.single = None, None
    member.group.reset(member)


_NAME = ctypes.create_string_buffer(b"group-draw")
_INTERFACE = _Interface(
    name=_Interface._fields_[0][1](lambda _smpl: ctypes.addressof(_NAME)), apply=lc.llama_sampler_i_apply(_apply),
    reset=lc.llama_sampler_i_reset(_reset), free=lc.llama_sampler_i_free(_free),
    backend_init=lc.llama_sampler_i_backend_init(lambda _smpl, _buft, _n: True),
    backend_apply=lc.llama_sampler_i_backend_apply(_backend_apply),
    backend_set_input=lc.llama_sampler_i_backend_set_input(_backend_set_input),
    backend_reset=lc.llama_sampler_i_backend_reset(_backend_reset))


class GroupDraw:
    """One sequence's in-graph chain, drawn with its group. Hands llama.cpp the token alone (no logits or
    probabilities rows to copy). Its CPU side (draw_on_cpu) serves a chain llama.cpp did not attach."""

    def __init__(self, group: DrawGroup, params: Any, n_vocab: int, seq_id: int | None = None,
                 groups: DrawGroups | None = None) -> None:
        self.group, self.n_vocab, self.seq_id, self.groups = group, n_vocab, seq_id, groups
        self.inputs: np.ndarray = np.zeros(4, np.float32)
        self.rng = random.Random()
        self.retune(params)
        self.slot: int | None = None  # in the group's current build
        self.single: _Build | None = None  # built alone (llama.cpp's probe of a new chain, or a second row)
        self.key = _next_key[0]
        _next_key[0] += 1
        _members[self.key] = self
        self.ptr = lc.llama_sampler_init(ctypes.cast(ctypes.pointer(_INTERFACE), ctypes.POINTER(lc.llama_sampler_i)),
                                         ctypes.c_void_p(self.key))

    def retune(self, params: Any) -> None:
        """Draw with these parameters from the next step (of this member's shape: see draws())."""
        self.seed = params.seed
        # top-p above 0 and min-p below 1 keep the most likely candidate, as llama.cpp's samplers keep min_keep=1
        self.inputs[:] = (0.0, 1.0 / params.temperature if params.temperature > 0 else 1.0,
                          max(params.top_p, 1e-6), min(params.min_p, 1.0 - 1e-6))
        self.retuned = True  # a graph reused since its build holds the old inputs: written at the next ask
        self.reseed()

    def draws(self, params: Any) -> bool:
        """Whether retuned to params it draws as a chain built for them would: their shape, no penalties."""
        return not penalized(params) and DrawShape.of(params, self.n_vocab) == self.group.shape

    def reseed(self) -> None:
        self.rng.seed(self.seed)

    def apply(self, ctx: int, data: Any) -> None:
        g = _ggml()
        group, shape = self.group, self.group.shape
        logits = _tensor(data.logits)
        source = logits.view_src
        build = group.build
        active = self.groups.active if self.groups is not None else None
        if source and active is not None and self.seq_id is not None and self.seq_id not in active:
            data.logits = data.probs = data.candidates = None  # no output in this step: nothing to draw
            return
        if source and self.slot is None and (build is None or build.slots < build.capacity):
            table = _tensor(source)
            if build is None:  # the first member asked in this graph builds everyone's draw
                members = [_members[key] for key in group.resets | {self.key} if key in _members]
                if active is not None:
                    members = [m for m in members if m.seq_id is None or m.seq_id in active]
                build = group.build = _Build(capacity=max(len(members), 1))
                m = build.capacity
                build.rows = g.ggml_new_tensor_1d(ctx, _I32, m)
                g.ggml_set_input(build.rows)
                build.row_of = np.zeros(m, np.int32)
                if shape.kind != "greedy":
                    build.params = g.ggml_new_tensor_2d(ctx, _F32, m, 4)
                    g.ggml_set_input(build.params)
                    build.params_of = np.zeros((4, m), np.float32)
                x = g.ggml_get_rows(ctx, source, build.rows)  # [n_vocab, m]
                build.tokens = _build_draw(g, ctx, x, table.ne[0], m, shape, build.params)
            self.slot = build.slots
            build.slots += 1
            build.row_of[self.slot] = logits.view_offs // table.nb[1]
            if build.params is not None:
                build.params_of[:, self.slot] = self.inputs
            data.sampled = g.ggml_view_1d(ctx, build.tokens, 1, self.slot * 4)
        else:  # alone: a probe's graph, or a second row of this sequence in one build
            single = self.single = _Build(capacity=1)
            if shape.kind != "greedy":
                single.params = g.ggml_new_tensor_2d(ctx, _F32, 1, 4)
                g.ggml_set_input(single.params)
                single.params_of = np.zeros((4, 1), np.float32)
            n = logits.ne[0]
            x = g.ggml_reshape_2d(ctx, data.logits, n, 1)
            data.sampled = _build_draw(g, ctx, x, n, 1, shape, single.params)
        data.logits = None
        data.probs = None
        data.candidates = None

    def set_input(self) -> None:
        """Before each step that samples this sequence. The first member asked in a step writes every member's
        inputs at once, a uniform number each from the group's generator; a seeded member then writes its own
        number, from its own generator (its tokens are its seed's alone)."""
        g = _ggml()
        build, slot, single = self.group.build, self.slot, self.single
        if single is not None and single.params is not None:
            self.inputs[0] = min(self.rng.random(), U_MAX)
            single.params_of[:, 0] = self.inputs
            g.ggml_backend_tensor_set(single.params, single.params_of.ctypes.data, 0, single.params_of.nbytes)
        if build is None or slot is None:
            return
        if slot in build.asked:  # every member in the step asks once: a second ask is the next step's
            build.asked.clear()
        if not build.asked:
            # every step: an input's memory may be reused by the graph once it has been read
            g.ggml_backend_tensor_set(build.rows, build.row_of.ctypes.data, 0, build.row_of.nbytes)
            if build.params is not None:
                build.params_of[0] = np.minimum(self.group.rng.random(build.capacity, dtype=np.float32), U_MAX)
                g.ggml_backend_tensor_set(build.params, build.params_of.ctypes.data, 0, build.params_of.nbytes)
        build.asked.add(slot)
        if self.seed is not None and build.params is not None:
            build.params_of[0, slot] = min(self.rng.random(), U_MAX)
            g.ggml_backend_tensor_set(build.params, build.params_of.ctypes.data + slot * 4, slot * 4, 4)
        if build.params is not None:
            if self.retuned:  # its temperature, top_p and min_p, into its column of the group's inputs
                m = build.capacity
                build.params_of[1:, slot] = self.inputs[1:]
                for i in (1, 2, 3):
                    offset = (i * m + slot) * 4
                    g.ggml_backend_tensor_set(build.params, build.params_of.ctypes.data + offset, offset, 4)
                self.retuned = False
            self.inputs[0] = build.params_of[0, slot]

    def drawn_with(self) -> np.ndarray:
        """The inputs of its last draw (u, 1/temperature, top_p, min_p)."""
        return np.array(self.inputs, copy=True)


class DrawGroups:
    """A context's groups, by shape."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab
        self.groups: dict[DrawShape, DrawGroup] = {}
        # The sequences with an output in the batch being decoded (Context.decode), None: unknown (every member
        # counted). A member whose sequence has none adds nothing to the graph: attached and idle, it costs nothing.
        self.active: set[int] | None = None

    def sampler(self, params: Any, seq_id: int | None = None) -> GroupDraw | None:
        """A new in-graph chain for params (of sequence seq_id), drawn with others of its shape; None where no group
        draws them."""
        shape = DrawShape.of(params, self.n_vocab)
        if shape is None or (shape.kind == "top_k" and self.n_vocab > _MAX_SORT_COLS
                             and block_size(self.n_vocab, shape.top_k) is None):
            return None
        group = self.groups.get(shape)
        if group is None:
            group = self.groups[shape] = DrawGroup(shape)
        return GroupDraw(group, params, self.n_vocab, seq_id, self)
