"""The OpenAPI document at /openapi.json: it lists exactly the app's routes, and schemathesis, run against a live
worker from that document, finds no server error and no answer (status, content type, headers, body, each event of
a stream) that the document does not describe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess
from worker.config import Settings
from worker.http.app import create_app
from worker.http.auth import OPEN_PATHS
from worker.http.openapi import document

TOKEN = "schemathesis-token"
SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]
MAX_EXAMPLES = 8  # per operation and phase; the coverage phase adds its boundary cases on top
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261123"))  # fixed: a CI run can be replayed; change it to explore
RUN_LIMIT_S = 420  # a hard limit for the whole schemathesis run


def _document() -> dict:
    """The document of a fresh app (built from its route table and models, so it depends on code only)."""
    return document(create_app(Settings(_cli_parse_args=[])))


async def test_document_lists_exactly_the_apps_routes():
    app = create_app(Settings(_cli_parse_args=[]))
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    doc = document(app)
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert documented == routes
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert (op.get("security") == []) == (path in OPEN_PATHS), (method, path)
            assert "responses" in op and all(code.isdigit() for code in op["responses"])
            if method == "post":
                assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].startswith(
                    "#/components/schemas/")
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(doc)
    assert refs <= set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])


async def test_document_is_served_without_the_token():
    w = WorkerProcess(["--parallel", "1", "--ctx-size", "128"], env={"LLORCH_API_TOKEN": TOKEN}).start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{w.url}/openapi.json") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            served = await resp.json()
    finally:
        w.stop()
    assert served == json.loads(json.dumps(_document()))
    assert served["openapi"].startswith("3.1")
    assert served["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


@pytest.fixture(scope="module")
def st_worker():
    """Small contexts and a request timeout keep each generated request short."""
    w = WorkerProcess(["--parallel", "2", "--ctx-size", "48", "--max-queue", "8", "--request-timeout", "1",
                       "--api-token", TOKEN]).start()
    yield w
    w.stop()


@pytest.mark.timeout(RUN_LIMIT_S + 60)
def test_schemathesis_finds_nothing(st_worker, tmp_path: Path):
    # Every check but positive_data_acceptance: the schema cannot say everything the worker refuses with a 400
    # (prompt + max_tokens must fit the context, token ids the vocabulary, a chat template may refuse a role order).
    cmd = [*SCHEMATHESIS, "run", f"{st_worker.url}/openapi.json",
           "--header", f"Authorization: Bearer {TOKEN}",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
           "--request-timeout", "60", "--suppress-health-check", "all",
           "--report", "json", "--report-dir", str(tmp_path / "report"), "--no-color"]
    t0 = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_LIMIT_S, check=False,
                                env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran past {RUN_LIMIT_S} s:\n{(exc.stdout or '')[-4000:]}")
    took = time.monotonic() - t0
    reports = list((tmp_path / "report").glob("*.json"))
    assert reports, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads(reports[0].read_text())
    cases = report["test_cases"]
    print(f"\nschemathesis {report['schemathesis_version']}: {report['operations']['tested']} operations, "
          f"{cases['generated']} cases, {cases['with_failures']} with failures, {took:.0f} s")
    assert result.returncode == 0 and report["exit_code"] == 0, result.stdout[-8000:]
    assert not report["failures"] and not report["errors"] and cases["errored"] == 0, result.stdout[-8000:]
    # Every documented operation but the document's own (schemathesis leaves out the URL it loads the schema from).
    documented = {f"{m.upper()} {p}" for p, item in _document()["paths"].items() for m in item}
    assert set(report["valid_rates"]) == documented - {"GET /openapi.json"}, set(report["valid_rates"])
    assert report["operations"]["tested"] == len(documented) - 1
    assert cases["generated"] >= 20 * len(documented)
    bad = [line for line in st_worker.lines if "unhandled error" in line or "Traceback" in line]
    assert not bad, bad[:5]
