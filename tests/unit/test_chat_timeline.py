"""bench.chat_timeline's matching of the client's stamps to the worker's trace (no model, no server)."""

import math

from bench.chat_timeline import timeline


def test_each_request_gets_its_own_arrival_tokenizing_job_and_prompt_step() -> None:
    # two requests sent 1 ms apart; the second's chunk (40 tokens) goes in a later prompt step than the first's (30)
    trace = {
        "requests": [[10.0005, "/v1/completions"], [10.0012, "/v1/completions"], [10.0001, "/v1/ready"]],
        "tokenize": [[10.0010, 10.0050, 100], [10.0015, 10.0060, 120]],
        "jobs": [{"created": 10.0052, "submit": 10.0052, "prompt": 100, "cached": 70, "first": 10.0200},
                 {"created": 10.0062, "submit": 10.0062, "prompt": 120, "cached": 80, "first": 10.0350}],
        "steps": [{"begin": 10.0055, "end": 10.0190, "parts": [[0, 30, 70]]},
                  {"begin": 10.0195, "end": 10.0220, "parts": [[0, 1, 100], [1, 1, 80]]},
                  {"begin": 10.0225, "end": 10.0340, "parts": [[1, 40, 80]]}],
    }
    rows = timeline(trace, [(10.0011, 10.0360), (10.0000, 10.0210)])
    first, second = rows  # in the order they were sent
    assert math.isclose(first["arrived"], 0.5) and math.isclose(first["tokenized"], 5.0)
    assert math.isclose(first["prompt_step"], 5.5) and math.isclose(first["first_text"], 20.0)
    assert math.isclose(first["client"], 21.0)
    assert math.isclose(second["arrived"], 0.1) and math.isclose(second["tokenizing"], 0.4)
    assert math.isclose(second["job"], 5.1) and math.isclose(second["prompt_step"], 21.4)
    assert math.isclose(second["prompt_step_end"], 32.9) and math.isclose(second["client"], 34.9)
