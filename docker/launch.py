"""The images' entry into the worker: load llama.cpp's backends from the wheel, then run `llm-worker-rbee`.

The images build llama.cpp with dynamically loaded backends (GGML_BACKEND_DL=ON): the CPU code once per x86-64
level, picked at start for the machine it runs on, and the CUDA backend as a module that loads only where a
driver is. ggml looks for those modules next to the executable and in the working directory; docker/build-wheel.sh
puts them in llama_cpp/lib beside libggml.so, so they are loaded from there before the worker initialises
llama.cpp (llama_backend_init loads nothing more once a backend is registered). A build with backends linked in
(the usual `pip install llama-cpp-python`) already has them registered and is left as it is.

    python docker/launch.py [worker flags]      # what the entrypoint runs
    python docker/launch.py --list-backends     # the backends and devices this llama.cpp build offers here
"""

from __future__ import annotations

import ctypes
import os
import re
import sys


def _loaded_libggml(libdir: str) -> str:
    """The libggml that libllama was linked with, as the loader mapped it.

    A wheel cannot hold symbolic links, so libggml.so, libggml.so.0 and libggml.so.0.x are three copies of one
    file: opening another name than libllama's own (its SONAME, libggml.so.0) would load a second libggml with a
    registry of its own, and backends registered there would stay unknown to llama.cpp.
    """
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.rstrip("\n").split(maxsplit=5)[-1] for line in maps}
        for pattern in (r"libggml\.so\.\d+", r"libggml\.so(\.\d+)*"):  # the SONAME first
            found = sorted(p for p in mapped if re.fullmatch(pattern, os.path.basename(p)))
            if found:
                return found[0]
    except OSError:  # not Linux
        pass
    for name in ("libggml.so.0", "libggml.0.dylib", "libggml.dylib", "libggml.so"):
        if os.path.exists(os.path.join(libdir, name)):
            return os.path.join(libdir, name)
    return os.path.join(libdir, "libggml.so")


def _ggml() -> tuple[ctypes.CDLL, str]:
    # worker first: it loads libstdc++ globally, which llama.cpp's CUDA build needs (see worker/__init__.py)
    import worker  # noqa: F401, I001
    import llama_cpp.llama_cpp as lc  # loads libllama and, through it, libggml

    libdir = os.path.dirname(lc._lib._name)
    lib = ctypes.CDLL(_loaded_libggml(libdir))
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_get.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    return lib, libdir


def load_backends() -> dict[str, object]:
    """Register the wheel's backend modules if none is registered; say what is there afterwards."""
    lib, libdir = _ggml()
    loaded = False
    if lib.ggml_backend_reg_count() == 0:
        lib.ggml_backend_load_all_from_path(libdir.encode())
        loaded = True
    backends = [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                for i in range(lib.ggml_backend_reg_count())]
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        devices.append(f"{lib.ggml_backend_dev_name(dev).decode()} ({lib.ggml_backend_dev_description(dev).decode()})")
    return {"libdir": libdir, "loaded_from_libdir": loaded, "backends": backends, "devices": devices}


def main(argv: list[str]) -> int:
    found = load_backends()
    if not found["backends"]:
        print(f"llm-worker-rbee: no llama.cpp backend could be loaded from {found['libdir']}", file=sys.stderr)
        return 3
    if argv[:1] == ["--list-backends"]:
        for key, value in found.items():
            print(f"{key}: {value}")
        return 0
    from worker.cli import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
