"""The images' entry into the worker: `llm-worker-rbee`, plus a look at the backends this llama.cpp build offers.

The images build llama.cpp with dynamically loaded backends (GGML_BACKEND_DL=ON): the CPU code once per x86-64
level, picked at start for the machine it runs on, and the CUDA backend as a module that loads only where a
driver is. docker/build-wheel.sh puts them in llama_cpp/lib beside libggml.so, and the worker's llama layer
(worker/engine/llama.py) loads them from there when none is linked in.

    python docker/launch.py [worker flags]      # what the entrypoint runs
    python docker/launch.py --list-backends     # the backends and devices this llama.cpp build offers here
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list-backends"]:
        from worker.llamacpp.backend import backends
        from worker.narration import configure

        configure(worker_id=None, level="warning")
        found = backends()
        for key, value in found.items():
            print(f"{key}: {value}")
        return 0 if found["backends"] else 3
    from worker.cli import main as worker_main

    return worker_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
