"""Hands this machine's pip settings to an image build as build secrets, for building behind a proxy whose
certificate authority only the host trusts, or from a private index.

    python3 docker/pip-secrets.py DIR       # writes DIR/pip.conf and DIR/ca.crt, prints the build flags:
    podman build $(python3 docker/pip-secrets.py /tmp/pip-secrets) -f Dockerfile.cpu .
        --secret id=pip.conf,src=DIR/pip.conf --secret id=ca.crt,src=DIR/ca.crt

pip.conf holds what `pip config list` says about where packages come from (index-url, extra-index-url,
trusted-host, timeout, retries, proxy), without entries that name files on this machine (file:// indexes,
find-links folders, constraint files), which the build cannot see. ca.crt is the CA bundle pip trusts here
(`cert`, PIP_CERT, else REQUESTS_CA_BUNDLE / SSL_CERT_FILE). The Dockerfiles mount both only into the RUN steps
that run pip; neither ends up in a layer.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

KEEP = {"index-url", "extra-index-url", "trusted-host", "timeout", "default-timeout", "retries", "proxy"}


def pip_config() -> dict[str, str]:
    """`pip config list` as {"section.key": value}; environment entries (":env:.key") count as global."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=True, capture_output=True,
                         text=True).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = "global." + key.removeprefix(":env:.") if key.startswith(":env:.") else key
        found[key] = ast.literal_eval(value)
    return found


def _local(word: str) -> bool:
    return word.startswith(("/", "file:", "./", "~"))


def write(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    config = pip_config()
    sections: dict[str, list[str]] = {}
    for dotted, value in sorted(config.items()):
        section, _, key = dotted.partition(".")
        if key not in KEEP:
            continue
        words = [w for w in value.split() if not _local(w)]
        if words:
            sections.setdefault(section, []).append(f"{key} = {' '.join(words)}")
    text = "".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
    (directory / "pip.conf").write_text(text)
    flags = ["--secret", f"id=pip.conf,src={directory / 'pip.conf'}"]
    cert = (config.get("global.cert") or os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("SSL_CERT_FILE"))
    if cert and Path(cert).is_file():
        shutil.copyfile(cert, directory / "ca.crt")
        flags += ["--secret", f"id=ca.crt,src={directory / 'ca.crt'}"]
    return flags


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: pip-secrets.py DIR")
    print(" ".join(write(Path(sys.argv[1]))))
