"""llama.cpp's process-wide state: backend init, its log routed into ours, and ggml's device API."""

from __future__ import annotations

import collections
import ctypes
import os
import re
import threading
from typing import Any

import llama_cpp as lc
from loguru import logger

# ggml_log_level → loguru. llama.cpp's INFO is load-time chatter: it goes to our debug level.
_LOG_LEVELS = {1: "DEBUG", 2: "DEBUG", 3: "WARNING", 4: "ERROR"}
_ERROR = 4
_log_state = threading.local()
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)  # llama.cpp's last error lines, for reasons
_backend_ready = False
_backend_lock = threading.Lock()


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


def clear_errors() -> None:
    _recent_errors.clear()


def last_errors() -> str:
    """llama.cpp's error lines since clear_errors(): the reason a load or a context creation failed."""
    return "; ".join(_recent_errors) or "llama.cpp gave no reason"


def _libllama_dir() -> str:
    # llama-cpp-python's private handle on libllama: the one place that reads it, to change on a pin bump.
    return str(os.path.dirname(lc.llama_cpp._lib._name))


_held_lib: ctypes.PyDLL | None = None


def gil_held(name: str) -> Any:
    """The llama.cpp function `name`, called without letting go of the GIL: for calls that return at once.
    ctypes lets go around every foreign call, and the thread must then take it back; while another thread runs
    Python (the event loop writing a step's tokens, a burst of requests parsed) that wait lasts until it blocks or
    is made to yield (sys.getswitchinterval(), 5 ms). The engine thread makes such calls per sequence per step."""
    global _held_lib
    if _held_lib is None:
        _held_lib = ctypes.PyDLL(lc.llama_cpp._lib._name)  # the loaded libllama, its functions keeping the GIL
    source = getattr(lc.llama_cpp._lib, name)
    fn = getattr(_held_lib, name)
    fn.argtypes, fn.restype = source.argtypes, source.restype
    return fn


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
        path = _libggml_path(_libllama_dir())
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
    return _ggml_lib if isinstance(_ggml_lib, ctypes.CDLL) else None


def _load_backend_modules() -> None:
    """Builds with GGML_BACKEND_DL (the images') keep the CPU and GPU backends as modules in llama_cpp/lib, where
    ggml does not look by itself: load them from there when none is linked in."""
    lib = _ggml()
    if lib is not None and lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path(_libllama_dir().encode())


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


