from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.config import ConfigError, available_cpus, cgroup_cpu_quota, load_settings


def test_defaults_match_the_contract():
    s = load_settings([])
    assert (s.host, s.port, s.parallel, s.max_queue, s.backend, s.gpu_layers) == \
        ("127.0.0.1", 8080, 4, 64, "auto", "all")
    assert s.max_body_bytes == 4 * 1024 * 1024 and s.drain_timeout == 30 and s.log_format == "pretty"
    assert s.worker_id.startswith("worker-")


def test_flags_beat_env_beat_toml(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text("parallel = 3\nmax_queue = 5\nctx_size = 777\n")
    monkeypatch.setenv("LLM_WORKER_MAX_QUEUE", "9")
    s = load_settings(["--config", str(cfg), "--ctx-size", "2048"])
    assert (s.parallel, s.max_queue, s.ctx_size) == (3, 9, 2048)


def test_llorch_env_names(monkeypatch):
    monkeypatch.setenv("LLORCH_API_TOKEN", "t")
    monkeypatch.setenv("LLORCH_LOG_FORMAT", "json")
    s = load_settings(["--host", "0.0.0.0"])
    assert s.api_token == "t" and s.log_format == "json"


def test_gpu_layers_and_tensor_split():
    s = load_settings(["--gpu-layers", "12", "--tensor-split", "3, 1"])
    assert s.gpu_layers == 12 and s.tensor_split_values == [3.0, 1.0]


def test_cache_ram_is_mib_with_llama_servers_default_and_conventions():
    from worker.runtime import host_cache

    assert load_settings([]).cache_ram is None  # decided by where the model runs
    default = host_cache(load_settings([]))
    assert default is not None and default.budget == 8192 * 2**20
    assert host_cache(load_settings([]), offloaded=True) is None  # off on a GPU unless asked for
    asked = host_cache(load_settings(["--cache-ram", "1024"]), offloaded=True)
    assert asked is not None and asked.budget == 1024 * 2**20
    unlimited = host_cache(load_settings(["--cache-ram", "-1"]))
    assert unlimited is not None and unlimited.budget is None
    assert host_cache(load_settings(["--cache-ram", "0"])) is None


@pytest.mark.parametrize("argv", [
    ["--parallel", "0"], ["--gpu-layers", "-2"], ["--tensor-split", "a,b"], ["--backend", "tpu"],
    ["--worker-id", "has space"], ["--host", "10.1.2.3"], ["--log-format", "xml"], ["--request-timeout", "0"],
    ["--cache-ram", "-2"], ["--cache-ram", "1.5"],
    # past ggml's 512 threads llama.cpp segfaulted; an endless drain lost the exit watchdog (a Timer of inf)
    ["--threads", "513"], ["--threads-batch", "100000"], ["--drain-timeout", "inf"], ["--request-timeout", "inf"],
    ["--write-timeout", "1e400"], ["--heartbeat-interval", "0.000001"],
    ["--spec-type", "ngram", "--spec-draft-n-min", "10", "--spec-draft-n-max", "3"], ["--model", ""],
])
def test_bad_settings_raise_one_line(argv):
    with pytest.raises(ConfigError) as err:
        load_settings(argv)
    assert "\n" not in str(err.value)


def test_draft_settings_go_together():
    s = load_settings(["--spec-type", "draft", "--spec-draft-model", "d.gguf", "--spec-draft-gpu-layers", "all",
                       "--spec-draft-ctx-size", "512"])
    assert (s.spec_draft_model, s.spec_draft_gpu_layers, s.spec_draft_ctx_size) == ("d.gguf", "all", 512)
    assert load_settings(["--spec-type", "draft", "--spec-draft-model", "d.gguf"]).spec_draft_gpu_layers is None
    for argv, needle in ((["--spec-type", "draft"], "--spec-draft-model"),
                         (["--spec-draft-model", "d.gguf"], "--spec-type none"),
                         (["--spec-type", "ngram", "--spec-draft-gpu-layers", "3"], "--spec-draft-gpu-layers"),
                         (["--spec-type", "draft", "--spec-draft-model", "d", "--spec-draft-gpu-layers", "x"],
                          "--spec-draft-gpu-layers")):
        with pytest.raises(ConfigError) as err:
            load_settings(argv)
        assert needle in str(err.value), argv


def test_bad_toml_is_a_config_error(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("parallel = = 3\n")
    with pytest.raises(ConfigError):
        load_settings(["--config", str(cfg)])
    cfg.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError):
        load_settings(["--config", str(cfg)])


def test_llama_threads_leave_a_cpu_and_batches_use_as_many():
    s = load_settings([])
    cpus = len(os.sched_getaffinity(0))
    assert s.threads == s.threads_batch == max(1, cpus - 1)


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc_file = tmp_path / "proc_cgroup"
    proc_file.write_text(proc)
    return root, proc_file


@pytest.mark.parametrize(("proc", "files", "quota"), [
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
    ("0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "200000 100000\n"}, 2.0),
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                                      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 3.0),
    ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("", {}, None),
], ids=["v2-none", "v2-1.5", "v2-nested", "v1-3", "v1-none", "no-cgroup"])
def test_cgroup_cpu_quota(tmp_path: Path, proc, files, quota):
    root, proc_file = _cgroup(tmp_path, proc, files)
    assert cgroup_cpu_quota(root, proc_file) == quota
    expected = len(os.sched_getaffinity(0)) if quota is None else max(1, min(len(os.sched_getaffinity(0)),
                                                                           int(quota)))
    assert available_cpus(root, proc_file) == expected


def test_cors_origins_and_served_model_name():
    s = load_settings(["--cors-allow-origins", "http://localhost:3000/, https://app.example.com",
                       "--served-model-name", "acme/chat-1"])
    assert s.cors_origins == ["http://localhost:3000", "https://app.example.com"]
    assert s.served_model_name == "acme/chat-1"
    assert load_settings([]).cors_origins == [] and load_settings(["--cors-allow-origins", "*"]).cors_origins == ["*"]


@pytest.mark.parametrize("argv", [["--cors-allow-origins", "app.example.com"], ["--cors-allow-origins", " , "],
                                  ["--cors-allow-origins", "http://a.example/path"],
                                  ["--served-model-name", "/abs/path"], ["--served-model-name", "has space"]])
def test_bad_cors_origins_and_served_names_are_config_errors(argv):
    with pytest.raises(ConfigError) as err:
        load_settings(argv)
    assert err.value.args[0].startswith("invalid setting --")


def test_public_model_ids_never_show_a_path():
    from worker.models.resolve import public_id

    assert public_id("hf:Qwen/Qwen3-0.6B-GGUF:*Q8_0.gguf") == "Qwen/Qwen3-0.6B-GGUF"
    assert public_id("embedded:SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert public_id("/srv/models/llama-3.1-8b.Q4_K_M.gguf") == "llama-3.1-8b.Q4_K_M"
    assert public_id("/data/checkpoints/Qwen3-0.6B/") == "Qwen3-0.6B"


def test_a_profile_dir_that_is_a_file_is_a_config_error(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_settings(["--profile-dir", str(tmp_path / "f")])
    assert load_settings(["--profile-dir", str(tmp_path / "new")]).profile_dir == tmp_path / "new"


def test_a_command_that_does_not_serve_is_not_held_to_the_token_rule(monkeypatch):
    """The image sets LLM_WORKER_HOST=0.0.0.0; `convert` there listens on nothing and has no token to give."""
    monkeypatch.setenv("LLM_WORKER_HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="without an API token"):
        load_settings([])
    assert load_settings([], serving=False).host == "0.0.0.0"


def test_a_config_file_that_is_a_folder_or_not_toml_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_settings(["--config", str(tmp_path)])
    (tmp_path / "bad.toml").write_text("parallel = ")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML"):
        load_settings(["--config", str(tmp_path / "bad.toml")])
