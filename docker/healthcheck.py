"""The images' HEALTHCHECK: healthy while GET /v1/ready answers 200, i.e. the model is loaded and serving.

Unhealthy while the model loads (503), after a failed load, and once the process is gone. It asks the port the
worker listens on (LLM_WORKER_PORT, 8080 by default) on the loopback address, which a worker bound to 0.0.0.0
answers too; /v1/ready needs no token.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("LLM_WORKER_PORT") or "8080"
    url = f"http://127.0.0.1:{port}/v1/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {exc}")
        return 1
    print(f"{url}: {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
