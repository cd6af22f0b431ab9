#!/usr/bin/env bash
# The worker at another commit against this tree, alternated on this machine with the same load:
#   bash bench/ab_cpu.sh 014149c [rounds]
# Each side starts its own worker (bench.compare.start_worker: its defaults, --parallel 4) and runs bench.load
# (1 and 4 streams of 128 sampled tokens). Needs the venv of `make install`.
set -euo pipefail
REF=${1:?a git commit to compare with}; ROUNDS=${2:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OLD=$(mktemp -d); trap 'rm -rf "$OLD"' EXIT
git -C "$ROOT" archive "$REF" worker | tar -x -C "$OLD"
for round in $(seq "$ROUNDS"); do
  for side in before after; do
    dir=$ROOT; [ "$side" = before ] && dir=$OLD
    # `python -m worker` takes the worker package from the working directory: the side's own tree
    (cd "$dir" && PYTHONPATH="$dir:$ROOT" "$ROOT/.venv/bin/python" - <<'PY'
import asyncio
from bench.compare import start_worker
from bench.load import format_row, run_load
proc, url = start_worker(None, threads=1, parallel=4)
try:
    asyncio.run(run_load(url, streams=1, tokens=8))
    for n in (1, 4):
        print(format_row("worker", asyncio.run(run_load(url, streams=n, tokens=128))), flush=True)
finally:
    proc.terminate()
    proc.wait()
PY
    ) | sed "s/^/$side round $round /"
  done
done
