"""The thin layer over llama-cpp-python's low-level API: backend, logging, model and context.

Only this module and the scheduler call into llama.cpp. Model loading and tokenization may run on any thread;
a context is owned by the scheduler thread alone.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
from loguru import logger

# ggml_log_level → loguru. llama.cpp's INFO is load-time chatter: it goes to our debug level.
_LOG_LEVELS = {1: "DEBUG", 2: "DEBUG", 3: "WARNING", 4: "ERROR"}
_ERROR = 4
_log_state = threading.local()
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_backend_ready = False
_backend_lock = threading.Lock()


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and llama.cpp's reason."""


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp sends lines in pieces (level 5 continues the previous one): join them per thread.
    buf: list[str] = getattr(_log_state, "buf", [])
    if level != 5:
        _log_state.level = level
    buf.append(text.decode("utf-8", errors="replace"))
    joined = "".join(buf)
    if not joined.endswith("\n"):
        _log_state.buf = buf
        return
    _log_state.buf = []
    line = joined.rstrip()
    lvl = getattr(_log_state, "level", 1)
    if lvl == _ERROR:
        _recent_errors.append(line)
    if line:
        logger.bind(actor="llama.cpp").log(_LOG_LEVELS.get(lvl, "DEBUG"), line)


def init_backend() -> None:
    """Route llama.cpp's log into ours (not verbose=False, which would silence the process) and init once."""
    global _backend_ready
    with _backend_lock:
        if _backend_ready:
            return
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _load_backend_modules()
        lc.llama_backend_init()
        _backend_ready = True


def route_ggml_log(to_python: bool) -> None:
    """Send ggml's own log lines to our logger, or drop them in C. llama.cpp's own lines always reach our logger.

    On CUDA, ggml logs a DEBUG line at every decode step ("CUDA Graph id N reused"). Each one calls our Python
    callback from inside llama_decode, where it must take the GIL from the event loop's thread: ~70 us of a 1.3 ms
    step, measured on an H100. The engine drops them in steady decode steps, which allocate nothing; everywhere
    else they reach our log, where ggml's errors (a failed allocation, a CUDA error) say what went wrong.
    The sink is libc's abs(): it takes the level and returns, which the C calling conventions make safe for the
    callback's signature.
    """
    lib, sink = _ggml(), _c_sink()
    if lib is None or sink is None:
        return
    lib.ggml_log_set(_log_callback if to_python else sink, None)


def _c_sink() -> Any:
    try:
        return ctypes.cast(ctypes.CDLL(None).abs, lc.llama_log_callback)
    except (OSError, AttributeError):  # no libc to borrow from: ggml's lines keep going to Python
        return None


_ggml_lib: ctypes.CDLL | None | bool = False


def _libggml_path(libdir: str) -> str | None:
    """The libggml that libllama was linked with, as the loader mapped it.

    A wheel cannot hold symbolic links, so libggml.so, libggml.so.0 and libggml.so.0.x are copies of one file:
    opening another name than libllama's own (its SONAME) would load a second ggml with a registry of its own, and
    backends registered there would stay unknown to llama.cpp.
    """
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.rstrip("\n").split(maxsplit=5)[-1] for line in maps}
        for pattern in (r"libggml\.so\.\d+", r"libggml\.so(\.\d+)*"):  # the SONAME first
            found = sorted((p for p in mapped if re.fullmatch(pattern, os.path.basename(p))),
                           key=lambda p: (os.path.dirname(p) != os.path.realpath(libdir), p))  # libllama's first
            if found:
                return found[0]
    except OSError:  # not Linux
        pass
    return next((os.path.join(libdir, n) for n in ("libggml.so.0", "libggml.0.dylib", "libggml.dylib", "libggml.so")
                 if os.path.exists(os.path.join(libdir, n))), None)


def _ggml() -> ctypes.CDLL | None:
    """libllama's own libggml, for the backend and device API that llama-cpp-python does not bind."""
    global _ggml_lib
    if _ggml_lib is False:
        path = _libggml_path(os.path.dirname(lc.llama_cpp._lib._name))
        try:
            lib = ctypes.CDLL(path) if path else None
        except OSError:
            lib = None
        if lib is not None:
            lib.ggml_backend_reg_count.restype = ctypes.c_size_t
            lib.ggml_backend_reg_get.restype = ctypes.c_void_p
            lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
            lib.ggml_backend_reg_name.restype = ctypes.c_char_p
            lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            lib.ggml_backend_dev_count.restype = ctypes.c_size_t
            lib.ggml_backend_dev_get.restype = ctypes.c_void_p
            lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
            lib.ggml_backend_dev_type.restype = ctypes.c_int
            lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_name.restype = ctypes.c_char_p
            lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_description.restype = ctypes.c_char_p
            lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.POINTER(ctypes.c_size_t)]
        _ggml_lib = lib
    return _ggml_lib or None


def _load_backend_modules() -> None:
    """Builds with GGML_BACKEND_DL (the images') keep the CPU and GPU backends as modules in llama_cpp/lib, where
    ggml does not look by itself: load them from there when none is linked in."""
    lib = _ggml()
    if lib is not None and lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path(os.path.dirname(lc.llama_cpp._lib._name).encode())


def backends() -> dict[str, Any]:
    """What this llama.cpp offers here, once initialised: its libggml, backends and devices."""
    init_backend()
    lib = _ggml()
    if lib is None:
        return {"libggml": None, "backends": [], "devices": []}
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    return {
        "libggml": lib._name,
        "backends": [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                     for i in range(lib.ggml_backend_reg_count())],
        "devices": [f"{lib.ggml_backend_dev_name(d).decode()} ({lib.ggml_backend_dev_description(d).decode()})"
                    for d in devices],
    }


def gpu_memory_used() -> dict[str, int]:
    """Used bytes per GPU, from ggml's device API (total - free); empty when llama.cpp has no GPU device."""
    lib = _ggml()
    if lib is None:
        return {}
    out: dict[str, int] = {}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) != 1:  # GGML_BACKEND_DEVICE_TYPE_GPU
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out[lib.ggml_backend_dev_name(dev).decode()] = int(total.value - free.value)
    return out


def gpu_backend_name() -> str | None:
    """'cuda' or 'metal' when this llama.cpp build can offload, else None."""
    init_backend()
    if not lc.llama_supports_gpu_offload():
        return None
    info = (lc.llama_print_system_info() or b"").decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.lower()
    return "gpu"


@dataclass(frozen=True)
class ModelInfo:
    """The contract's model object, plus what the engine needs from the GGUF metadata."""

    ref: str
    path: str
    architecture: str
    quantization: str
    n_params: int
    n_ctx_train: int
    n_vocab: int
    n_layers: int
    size_bytes: int
    format: str
    name: str | None
    chat_template: str | None
    bos: str | None
    eos: str | None
    unk: str | None

    def public(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "n_params": self.n_params,
            "n_ctx_train": self.n_ctx_train,
            "n_vocab": self.n_vocab,
            "size_bytes": self.size_bytes,
            "format": self.format,
        }


class Model:
    """A loaded llama.cpp model and its vocabulary. Tokenization is safe from any thread."""

    def __init__(self, ptr: Any, info: ModelInfo, offloaded: bool) -> None:
        self.ptr = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.info = info
        self.offloaded = offloaded
        self.n_vocab = info.n_vocab
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        self._piece_cache: dict[int, bytes] = {}

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        ref: str,
        fmt: str,
        gpu_layers: int,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Model:
        init_backend()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        params = lc.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.main_gpu = main_gpu
        keep: list[Any] = []  # ctypes objects that must outlive the load call
        if tensor_split:
            n = lc.llama_max_devices()
            arr = (ctypes.c_float * n)(*(tensor_split + [0.0] * n)[:n])
            params.tensor_split = ctypes.cast(arr, ctypes.POINTER(ctypes.c_float))
            params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
            keep.append(arr)
        if progress is not None:

            def _on_progress(value: float, _user: ctypes.c_void_p) -> bool:
                progress(float(value))
                return True

            cb = lc.llama_progress_callback(_on_progress)
            params.progress_callback = cb
            keep.append(cb)
        _recent_errors.clear()
        ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            reason = "; ".join(_recent_errors) or "llama.cpp gave no reason"
            raise ModelLoadError(f"llama.cpp could not load {path}: {reason}")
        info = _read_info(ptr, path, ref, fmt)
        return cls(ptr, info, offloaded=gpu_layers != 0 and lc.llama_supports_gpu_offload())

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens render as nothing)."""
        cached = self._piece_cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = self._piece_cache[token] = buf.raw[:n]
        return cached

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))


def _meta(ptr: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_model_meta_val_str(ptr, key.encode(), buf, 256)
    if n < 0:
        return None
    if n >= 256:
        buf = ctypes.create_string_buffer(n + 1)
        lc.llama_model_meta_val_str(ptr, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _token_text(vocab: Any, token: int) -> str | None:
    if token < 0:
        return None
    text = lc.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", errors="replace") if text else None


def _read_info(ptr: Any, path: Path, ref: str, fmt: str) -> ModelInfo:
    vocab = lc.llama_model_get_vocab(ptr)
    ftype = (lc.llama_ftype_name(lc.llama_model_ftype(ptr)) or b"unknown").decode()
    template = lc.llama_model_chat_template(ptr, None)
    return ModelInfo(
        ref=ref,
        path=str(path),
        architecture=_meta(ptr, "general.architecture") or "unknown",
        quantization=ftype,
        n_params=int(lc.llama_model_n_params(ptr)),
        n_ctx_train=int(lc.llama_model_n_ctx_train(ptr)),
        n_vocab=int(lc.llama_vocab_n_tokens(vocab)),
        n_layers=int(lc.llama_model_n_layer(ptr)),
        size_bytes=path.stat().st_size,
        format=fmt,
        name=_meta(ptr, "general.name"),
        chat_template=template.decode("utf-8", errors="replace") if template else None,
        bos=_token_text(vocab, lc.llama_vocab_bos(vocab)),
        eos=_token_text(vocab, lc.llama_vocab_eos(vocab)),
        unk=_token_text(vocab, int(_meta(ptr, "tokenizer.ggml.unknown_token_id") or -1)),
    )


def create_context(
    model: Model, *, n_ctx: int, n_seq: int, n_batch: int, threads: int, threads_batch: int | None = None,
    flash_attn: str = "auto", n_outputs: int = 0,
) -> Any:
    params = lc.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq
    # Outputs (logits rows) one batch may ask for; 0 = n_batch. The engine needs one per sequence and step, and
    # sizing the output buffers and sampling graph for that keeps them small (2 x n_vocab floats per output).
    params.n_outputs_max = n_outputs
    params.n_threads = threads
    params.n_threads_batch = threads_batch or threads
    # Each sequence gets its own n_ctx/n_seq cells: an admitted request can never run out of KV cache.
    params.kv_unified = False
    params.flash_attn_type = {
        "auto": lc.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": lc.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": lc.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[flash_attn]
    params.no_perf = True
    # llama.cpp reads a GGUF's YaRN corrections for a few architectures only; the context takes them for any
    for key in ("yarn_ext_factor", "yarn_beta_fast", "yarn_beta_slow"):
        if (value := _meta(model.ptr, f"{model.info.architecture}.rope.scaling.{key}")) is not None:
            setattr(params, key, float(value))
    _recent_errors.clear()
    ctx = lc.llama_init_from_model(model.ptr, params)
    if not ctx:
        reason = "; ".join(_recent_errors) or "llama.cpp gave no reason"
        raise ModelLoadError(f"llama.cpp could not create a context of {n_ctx} tokens: {reason}")
    return ctx
