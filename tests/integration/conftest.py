from __future__ import annotations

import aiohttp
import pytest

from tests.integration.worker_process import WorkerProcess


@pytest.fixture(scope="session")
def worker():
    """The worker on the embedded default model: 4 slots of 1024 tokens, a queue of 8."""
    w = WorkerProcess(["--parallel", "4", "--ctx-size", "1024", "--max-queue", "8"]).start()
    yield w
    w.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session
