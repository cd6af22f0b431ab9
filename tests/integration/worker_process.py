"""Run the real worker as a process on a free port, and talk to it with a real HTTP client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class WorkerProcess:
    args: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # every JSON log line, in order
    lines: list[str] = field(default_factory=list)
    port: int | None = None
    _listening: threading.Event = field(default_factory=threading.Event)

    def start(self, wait_ready: bool = True, timeout: float = 60) -> WorkerProcess:
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "--port", "0", "--log-format", "json", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready:
            self.wait_for("model_load_complete", timeout)
            self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """model_load_complete is narrated just before the app marks itself ready: wait for /v1/ready to say so."""
        deadline = time.monotonic() + timeout
        if not self._listening.wait(timeout):
            raise TimeoutError(f"the worker never said where it listens:\n{''.join(self.lines)}")
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v1/ready", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code != 503:  # 503: still loading; anything else is for the test to see
                    return
            except OSError:
                if self.proc is not None and self.proc.poll() is not None:
                    return  # it exited (a failed callback, say): the test reads why
            time.sleep(0.02)
        raise TimeoutError(f"/v1/ready did not answer 200 within {timeout}s:\n{''.join(self.lines)}")

    def _read(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.lines.append(line)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.events.append(event)
            if event.get("action") == "server_listening":
                self.port = event["port"]
                self._listening.set()

    def wait_for(self, action: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events:
                if ev.get("action") == action:
                    return ev
            if self.proc and self.proc.poll() is not None:
                time.sleep(0.1)  # let the reader catch the last lines
                raise RuntimeError(f"worker exited {self.proc.returncode} before {action}:\n{''.join(self.lines)}")
            time.sleep(0.02)
        raise TimeoutError(f"no {action} within {timeout}s:\n{''.join(self.lines)}")

    def actions(self, job_id: str | None = None) -> list[str]:
        return [e["action"] for e in self.events if "action" in e and (job_id is None or e.get("job_id") == job_id)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc
        code = self.proc.wait(timeout)
        time.sleep(0.1)
        return code

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def output(self) -> str:
        return "".join(self.lines)


async def read_sse(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """Parse a whole SSE response into its events (each checked against its `event:` line)."""
    events = []
    async for event in iter_sse(resp):
        events.append(event)
    return events


async def iter_sse(resp: aiohttp.ClientResponse):
    name = None
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name, (name, data)
            yield data
