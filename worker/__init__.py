"""llm-worker-rbee: serves one model through llama.cpp over HTTP."""

import ctypes as _ctypes

__version__ = "0.1.0"

# llama.cpp's CUDA build segfaulted in its first std::ostream use (llama_model::print_info) when libstdc++ had
# not been loaded into the global symbol scope before the libraries it was linked against; the same process
# with LD_PRELOAD=libstdc++.so.6 ran. Loading it globally first, before anything imports llama_cpp, does the same.
try:
    _ctypes.CDLL("libstdc++.so.6", mode=_ctypes.RTLD_GLOBAL)
except OSError:  # not a glibc system (macOS has libc++): nothing to do
    pass
