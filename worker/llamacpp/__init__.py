"""The only package that imports llama-cpp-python: backend, model, context, sampler chains, quantization.

The rest of the worker speaks in its terms (Model, Context, SamplerChain); nothing else calls into llama.cpp.
"""

import ctypes as _ctypes

# llama.cpp's CUDA build segfaulted in its first std::ostream use (llama_model::print_info) when libstdc++ had
# not been loaded into the global symbol scope before the libraries it was linked against; the same process
# with LD_PRELOAD=libstdc++.so.6 ran. Loading it globally first, before llama_cpp is imported, does the same.
try:
    _ctypes.CDLL("libstdc++.so.6", mode=_ctypes.RTLD_GLOBAL)
except OSError:  # not a glibc system (macOS has libc++): nothing to do
    pass

from worker.llamacpp.backend import backends, gpu_backend_name, gpu_memory_used, init_backend
from worker.llamacpp.context import Context
from worker.llamacpp.model import Model, ModelInfo, ModelLoadError

__all__ = ["Context", "Model", "ModelInfo", "ModelLoadError", "backends", "gpu_backend_name", "gpu_memory_used",
           "init_backend"]
