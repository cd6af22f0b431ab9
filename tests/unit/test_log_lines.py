"""Log lines leave through a writer thread of their own (a write lets go of the GIL: see narration._LineWriter)."""

import ctypes
import json
import threading

from worker import narration
from worker.llamacpp import context


def test_every_line_is_written_in_order_once_flushed(capsys):
    narration.configure(worker_id="w-test", log_format="json", level="info")
    try:
        def lines(who: str) -> None:
            for i in range(200):
                narration.narrate("probe", f"{who} {i}", n=i, who=who)

        threads = [threading.Thread(target=lines, args=(who,)) for who in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        narration.flush_logs()
        events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        for who in ("a", "b"):
            assert [e["n"] for e in events if e.get("who") == who] == list(range(200))
    finally:
        narration.configure(worker_id=None, log_format="pretty", level="info")


def test_a_warning_is_written_at_once_after_the_lines_before_it(capsys):
    """A warning or an error may be the last words before a crash: it is not left in the queue."""
    narration.configure(worker_id="w-test", log_format="pretty", level="info")
    try:
        for i in range(50):
            narration.narrate("probe", f"line {i}")
        narration.narrate("probe", "something is wrong", level="warning")
        err = capsys.readouterr().err  # no flush: the warning wrote what was queued, then itself
        lines = [line for line in err.splitlines() if "probe:" in line]
        assert len(lines) == 51 and "something is wrong" in lines[-1]
    finally:
        narration.flush_logs()


def test_the_engine_threads_per_token_llama_cpp_calls_keep_the_gil():
    """ctypes lets go of the GIL around a foreign call unless the function comes from a PyDLL; the calls made per
    sequence per step must not, or each waits for the event loop's thread to yield."""
    for fn in (context._sampled_token_ith, context._logits_ith, context._sampler_accept, context._sampler_reset,
               context._seq_rm):
        assert fn._flags_ & ctypes._FUNCFLAG_PYTHONAPI, fn.__name__


def test_huggingface_hubs_own_lines_are_json_lines_too(capsys):
    """huggingface_hub writes its retries to stderr through a handler of its own: with --log-format json each is
    one JSON object (actor "hub"), as every other line."""
    import logging

    narration.configure(worker_id="w-test", log_format="json", level="info")
    try:
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown "
                                                                 "while requesting GET\nRetrying in 1s")
        narration.flush_logs()
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and all(line.startswith("{") for line in lines), err
        event = json.loads(lines[-1])
        assert event["actor"] == "hub" and "Retrying in 1s" in event["message"], event
    finally:
        narration.configure(worker_id=None, log_format="pretty", level="info")
