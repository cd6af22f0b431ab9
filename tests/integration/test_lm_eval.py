"""lm-eval's `local-completions` model against the real worker, offline: a loglikelihood (multiple-choice) task and a
generate-until task, written into tmp_path as task YAML and JSONL data, run through `lm_eval.simple_evaluate` with
batch_size > 1 (lists of prompts) and lm-eval's default tokenizer choice, which finds vLLM's /tokenizer_info,
/tokenize and /detokenize on the worker and uses them (the fallback, a Hugging Face tokenizer, would need a download
and transformers, neither of which is here).

lm-eval runs in a child process so that the hub and datasets are offline from their import on (both read
HF_*_OFFLINE once), with empty caches and every proxy-honouring client pointed at a closed port: a download
attempt fails the run instead of passing unnoticed.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.worker_process import WorkerProcess

pytestmark = pytest.mark.timeout(240)

CAPITALS = [  # (country, choices, index of the answer)
    ("France", ["Paris", "Berlin", "Madrid"], 0),
    ("Germany", ["Rome", "Berlin", "Lisbon"], 1),
    ("Italy", ["Vienna", "Oslo", "Rome"], 2),
    ("Spain", ["Madrid", "Athens", "Dublin"], 0),
    ("Japan", ["Seoul", "Tokyo", "Beijing"], 1),
]
SEQUENCES = [  # (prompt, target)
    ("1, 2, 3, 4,", " 5, 6, 7, 8, 9, 10"),
    ("Monday, Tuesday,", " Wednesday, Thursday, Friday"),
    ("a, b, c, d,", " e, f, g, h"),
    ("The opposite of hot is", " cold."),
]
MC_TEXT = "Question: What is the capital of {{country}}?\nAnswer:"
GEN_MAX_TOKENS = 8
BATCH_SIZE = 4


def task_files(root: Path) -> None:
    """The two tasks and their data, as a user writes them for `--include_path`."""
    (root / "capitals.jsonl").write_text("".join(
        json.dumps({"country": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in CAPITALS))
    (root / "sequences.jsonl").write_text("".join(
        json.dumps({"prompt": p, "target": t}) + "\n" for p, t in SEQUENCES))
    mc_text = json.dumps(MC_TEXT)  # a JSON string is a YAML one
    (root / "worker_capitals.yaml").write_text(f"""
task: worker_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "capitals.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: {mc_text}
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "worker_sequences.yaml").write_text(f"""
task: worker_sequences
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "sequences.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {GEN_MAX_TOKENS}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


def evaluate(config_path: str, out_path: str) -> None:
    """The child process: lm-eval's Python API, as a user calls it."""
    import logging

    import lm_eval

    logging.basicConfig(level=logging.INFO)  # the tokenizer lm-eval picked is in its log
    from lm_eval.tasks import TaskManager

    config = json.loads(Path(config_path).read_text())
    results = lm_eval.simple_evaluate(
        model="local-completions",
        # tokenizer_backend left to its default, "auto": lm-eval probes the worker for vLLM's tokenizer routes
        model_args={"base_url": config["base_url"], "model": config["model"], "max_length": 1024, "max_retries": 1},
        tasks=["worker_capitals", "worker_sequences"],
        task_manager=TaskManager(include_path=config["include_path"]),
        batch_size=BATCH_SIZE,
        log_samples=True,
    )
    assert results is not None
    keep = {"results": results["results"],
            "samples": {task: [{"doc": s["doc"], "resps": s["resps"], "filtered_resps": s["filtered_resps"],
                                "acc": s.get("acc"), "exact_match": s.get("exact_match")} for s in samples]
                        for task, samples in results["samples"].items()}}
    Path(out_path).write_text(json.dumps(keep, default=str))


@pytest.fixture(scope="module")
def evaluated(worker: WorkerProcess, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lm_eval")
    task_files(root)
    [model] = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused").models.list().data
    config = root / "config.json"
    config.write_text(json.dumps({"base_url": f"{worker.url}/v1/completions", "model": model.id,
                                  "include_path": str(root)}))
    out = root / "out.json"
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, so any download through a proxy fails
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "HF_DATASETS_CACHE": str(root / "datasets"), "TIKTOKEN_CACHE_DIR": str(root / "tiktoken"),
           "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1,localhost",
           "OPENAI_API_KEY": "unused"}
    child = f"from {__name__} import evaluate; evaluate({str(config)!r}, {str(out)!r})"
    run = subprocess.run([sys.executable, "-c", child], env=env, cwd=Path(__file__).parents[2], capture_output=True,
                         text=True, timeout=200)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "Auto-detected remote tokenizer support" in run.stderr, run.stderr[-6000:]
    assert not (root / "hf" / "hub").exists() or not any((root / "hf" / "hub").iterdir())  # nothing fetched
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def client(worker: WorkerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=120)


def worker_loglikelihoods(client: openai.OpenAI, context: str, continuations: list[str]) -> list[float]:
    """Each continuation's log-probability as the worker gives it: the whole text echoed with its logprobs, summed
    over the continuation's tokens (which lm-eval finds by tokenizing the context alone)."""
    def tokenize(text: str) -> list[int]:
        return client.post("/tokenize", body={"text": text, "add_special": False}, cast_to=object)["tokens"]

    context_ids = tokenize(context)
    wholes = [tokenize(context + continuation) for continuation in continuations]
    assert all(whole[:len(context_ids)] == context_ids for whole in wholes)
    scored = client.completions.create(model="m", prompt=wholes, max_tokens=1, logprobs=1, echo=True, temperature=0)
    return [sum(choice.logprobs.token_logprobs[len(context_ids):len(whole)])
            for choice, whole in zip(scored.choices, wholes, strict=True)]


def test_loglikelihood_task_scores_are_the_workers_logprobs(evaluated, client):
    acc = evaluated["results"]["worker_capitals"]["acc,none"]
    assert isinstance(acc, float) and 0 <= acc <= 1
    samples = sorted(evaluated["samples"]["worker_capitals"], key=lambda s: s["doc"]["country"])
    assert len(samples) == len(CAPITALS)
    for sample in samples:
        doc = sample["doc"]
        lls = [resp[0][0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert len(lls) == len(doc["choices"]) and all(math.isfinite(x) and x < 0 for x in lls)
        assert len(set(lls)) == len(lls)  # real scores tell the choices apart
        assert sample["acc"] == float(lls.index(max(lls)) == doc["answer"])
        context = MC_TEXT.replace("{{country}}", doc["country"])
        expected = worker_loglikelihoods(client, context, [" " + choice for choice in doc["choices"]])
        # batched (lm-eval) and alone (here) may differ in the last float bits of llama.cpp's matmuls
        assert lls == pytest.approx(expected, abs=2e-2), doc
    assert acc == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


def test_batches_arrive_as_lists_of_prompts(evaluated, worker):
    """batch_size > 1 is one request with a list of prompts: its jobs share the completion's id, one per prompt."""
    per_request: dict[str, int] = {}
    for event in worker.events:
        if event.get("action") == "inference_start" and (listed := re.fullmatch(r"(cmpl-\w+)-\d+", event["job_id"])):
            per_request[listed[1]] = per_request.get(listed[1], 0) + 1
    assert max(per_request.values()) == BATCH_SIZE


def test_generate_until_task_answers_are_the_workers_greedy_text(evaluated, client):
    em = evaluated["results"]["worker_sequences"]["exact_match,none"]
    assert isinstance(em, float) and 0 <= em <= 1
    samples = evaluated["samples"]["worker_sequences"]
    assert len(samples) == len(SEQUENCES)
    prompts = [sample["doc"]["prompt"] for sample in samples]
    greedy = client.completions.create(model="m", prompt=prompts, max_tokens=GEN_MAX_TOKENS, temperature=0,
                                       stop=["\n", "<|im_end|>"])
    for sample, choice in zip(samples, greedy.choices, strict=True):
        [answer] = sample["filtered_resps"]
        assert answer == choice.text and answer.strip(), sample["doc"]
        assert sample["exact_match"] == float(answer == sample["doc"]["target"])
