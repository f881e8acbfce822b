"""The server's absl flags (DESIGN.md § Contracts) and their translation into EngineConfig + ServeOptions.

Flags are defined with the contract's dashed names (`--kv-cache-page-size`); `normalize_argv` also
accepts the underscore spellings absl users expect (`--kv_cache_page_size`, `--noenable_prefix_caching`).
Everything here is cheap (no JAX, no gRPC): a bad value is reported in one line before any model loads.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from absl import flags

from engine.config import ATTENTION_BACKENDS, CACHE_STRATEGIES, DEVICE_FORMS, DTYPES, EngineConfig, parse_devices

_ENGINE_DEFAULTS = EngineConfig()
# (flag name, kind, help). Defaults come from EngineConfig so the two can never disagree.
ENGINE_FLAGS = (
    ("model-path", "string", "A .gguf file, an orbax checkpoint directory, or a Hugging Face repo id in the local "
                             "HF cache. Default: the embedded SmolLM2-135M-Instruct."),
    ("devices", "string", "cpu | gpu | gpu:0,1 | cpu:0,1 (several host devices). Default: first GPU, else CPU."),
    ("cache-strategy", "string", f"{' | '.join(CACHE_STRATEGIES)}: paged KV pages, or one max-length page "
                                 "per sequence."),
    ("enable-prefix-caching", "bool", "Reuse the KV pages of earlier requests that share a prefix (needs paged)."),
    ("kv-cache-page-size", "integer", "Tokens per KV page; a positive multiple of 16."),
    ("quantization-encoding", "string", f"Weights: {' | '.join(DTYPES)} (q8_0: int8 kept in memory). Default: "
                                        "float32 on CPU, bfloat16 on GPU."),
    ("max-batch-size", "integer", "Most sequences decoded in one step. Default: 32 on CPU, 256 on GPU."),
    ("max-length", "integer", "Longest sequence (prompt + completion). Default: min(model context, 4096)."),
    ("max-num-batched-tokens", "integer", "Token budget of one step (prefill chunks + decodes). Default: 512 on "
                                          "CPU, 8192 on GPU."),
    ("kv-cache-pages", "integer", "KV pool size in pages. Default: sized from --device-memory-utilization."),
    ("device-memory-utilization", "float", "Fraction of device memory the engine may use, in (0, 1]."),
    ("attention-backend", "string", f"{' | '.join(ATTENTION_BACKENDS)}; pallas on CPU runs in interpret mode."),
    ("max-waiting-requests", "integer", "Queued requests beyond which Generate answers RESOURCE_EXHAUSTED."),
    ("seed", "integer", "Seed for requests that set none."),
    ("async-scheduling", "bool", "Schedule step N+1 while step N runs on the device (its host work hidden behind "
                                 "the device); --noasync-scheduling books each step before the next."),
    ("max-stop-strings", "integer", "Most stop strings one request may give (more: INVALID_ARGUMENT)."),
    ("max-stop-string-length", "integer", "Longest stop string, in characters (longer: INVALID_ARGUMENT)."),
    ("max-prompt-bytes", "integer", "Largest prompt text (or chat messages), in UTF-8 bytes, refused before it is "
                                    "tokenized. Default: 32 per --max-length token."),
)
SERVE_FLAGS = (
    ("host", "string", "127.0.0.1", "Address to listen on (0.0.0.0 or [::] for all interfaces)."),
    ("port", "integer", 50051, "gRPC port; 0 picks a free one (printed when serving)."),
    ("http-port", "integer", 8000, "OpenAI-compatible HTTP API port (/v1/completions, /v1/chat/completions, "
                                   "/health, /metrics); 0 = off."),
    ("metrics-port", "integer", 0, "Prometheus /metrics port; 0 = off."),
    ("max-concurrent-rpcs", "integer", 256, "Most Generate calls in flight at once (each holds a thread); "
                                            "beyond it Generate answers RESOURCE_EXHAUSTED."),
    ("shutdown-timeout-seconds", "float", 25.0, "On SIGTERM/SIGINT, the whole shutdown's budget, signal to exit: "
                                               "in-flight streams may finish until the last few seconds, then are "
                                               "aborted. Default 25 fits Kubernetes' 30 s before SIGKILL."),
    ("coordinator-address", "string", None, "host:port of process 0's JAX coordinator: one server over several "
                                            "hosts (unset: one process)."),
    ("num-processes", "integer", None, "Processes (one per host) in a multi-host server; with "
                                       "--coordinator-address."),
    ("process-id", "integer", None, "This process's index in [0, --num-processes); process 0 serves gRPC."),
    ("distributed-timeout-seconds", "float", 300.0, "Multi-host start-up: how long every process waits for the "
                                                   "others to join before failing with the missing process ids."),
)
_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_boolean}
_EXPECTED = {"string": "a string", "integer": "an integer", "float": "a number", "bool": "true or false"}


class FlagError(ValueError):
    """A bad command line; the message is one line naming the flag, the value and what is allowed."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None   # None = no metrics endpoint
    http_port: int | None = 8000      # None = no HTTP API
    max_concurrent_rpcs: int = 256
    shutdown_timeout_seconds: float = 25.0
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed_timeout_seconds: float = 300.0


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines every server flag on `flag_values` (call once per FlagValues)."""
    for name, kind, help_text in ENGINE_FLAGS:
        default = getattr(_ENGINE_DEFAULTS, name.replace("-", "_"))
        _DEFINE[kind](name, default, help_text, flag_values=flag_values)
    for name, kind, default, help_text in SERVE_FLAGS:
        _DEFINE[kind](name, default, help_text, flag_values=flag_values)


def _kinds() -> dict[str, str]:
    return {name: kind for name, kind, *_ in ENGINE_FLAGS + SERVE_FLAGS}


def normalize_argv(argv: list[str]) -> list[str]:
    """Rewrites `--max_length=5` / `--no-enable-prefix-caching` etc. to the dashed names absl knows."""
    kinds, out = _kinds(), list(argv[:1])
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":  # everything after a bare `--` is positional
            return out + argv[i:]
        if not arg.startswith("-"):
            out.append(arg)
            continue
        prefix = "--" if arg.startswith("--") else "-"
        name, sep, value = arg[len(prefix):].partition("=")
        dashed = name.replace("_", "-")
        if dashed in kinds:
            name = dashed
        elif dashed.startswith("no") and kinds.get(dashed[2:].lstrip("-")) == "bool":
            name = "no" + dashed[2:].lstrip("-")
        out.append(prefix + name + sep + value)
    return out


def parse_argv(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses `argv` into `flag_values`; raises FlagError with one readable line."""
    try:
        return flag_values(normalize_argv(argv))
    except flags.IllegalFlagValueError as e:
        m = re.match(r"flag --([\w-]+)=(.*?): ", str(e))
        if m and m.group(1) in _kinds():
            raise FlagError(f"--{m.group(1)}={m.group(2)} is not allowed; it must be "
                            f"{_EXPECTED[_kinds()[m.group(1)]]}") from None
        raise FlagError(str(e)) from None
    except flags.UnrecognizedFlagError as e:
        raise FlagError(f"unknown flag --{e.flagname}; run with --helpfull to list the flags") from None
    except flags.Error as e:
        raise FlagError(str(e).splitlines()[0]) from None


def _check_port(name: str, port: int, zero_means: str) -> None:
    if not 0 <= port <= 65535:
        raise FlagError(f"--{name}={port} is not allowed; it must be in [0, 65535] (0 = {zero_means})")


def _check_http_port(http: int, grpc: int, metrics: int) -> None:
    _check_port("http-port", http, "no HTTP API")
    for name, other in (("--port", grpc), ("--metrics-port", metrics)):
        if http and http == other:
            raise FlagError(f"--http-port={http} is not allowed; it must differ from {name} (0 = no HTTP API)")


def _check_model_path(path: str | None) -> None:
    """Rejects a path that plainly names a file or directory which is not there (a repo id is left to the engine)."""
    looks_like_path = path is not None and (path.endswith(".gguf") or path.startswith(("/", "./", "../", "~")))
    if looks_like_path and not os.path.exists(os.path.expanduser(path)):
        raise FlagError(f"--model-path={path} does not exist; pass a .gguf file, an orbax checkpoint directory "
                        "or a Hugging Face repo id in the local HF cache")


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> tuple[EngineConfig, ServeOptions]:
    """Validated EngineConfig + ServeOptions from parsed flags; raises FlagError (one line)."""
    value = lambda name: flag_values[name].value
    engine_kwargs = {name.replace("-", "_"): value(name) for name, *_ in ENGINE_FLAGS}
    devices = engine_kwargs["devices"]
    try:
        if devices is not None:
            parse_devices(devices)
    except ValueError:  # worded as the command line was typed, like every other flag here
        raise FlagError(f"--devices={devices} is not allowed; use one of {DEVICE_FORMS}") from None
    _check_model_path(engine_kwargs["model_path"])
    try:
        config = EngineConfig(**engine_kwargs)
    except ValueError as e:  # EngineConfig's messages already name the flag and the allowed values
        raise FlagError(str(e)) from None
    _check_port("port", value("port"), "pick a free port")
    _check_port("metrics-port", value("metrics-port"), "no metrics endpoint")
    if value("metrics-port") and value("metrics-port") == value("port"):
        raise FlagError(f"--metrics-port={value('metrics-port')} is not allowed; it must differ from --port")
    _check_http_port(value("http-port"), value("port"), value("metrics-port"))
    if not value("host"):
        raise FlagError("--host='' is not allowed; give an address such as 127.0.0.1 or 0.0.0.0")
    if not value("shutdown-timeout-seconds") >= 0:  # NaN too
        raise FlagError(f"--shutdown-timeout-seconds={value('shutdown-timeout-seconds')} is not allowed; "
                        "it must be >= 0")
    if value("max-concurrent-rpcs") < 1:
        raise FlagError(f"--max-concurrent-rpcs={value('max-concurrent-rpcs')} is not allowed; it must be >= 1")
    if not value("distributed-timeout-seconds") > 0:  # NaN too
        raise FlagError(f"--distributed-timeout-seconds={value('distributed-timeout-seconds')} is not allowed; "
                        "it must be > 0")
    from engine.device.distributed import check as check_distributed
    try:
        check_distributed(value("coordinator-address"), value("num-processes"), value("process-id"))
    except ValueError as e:
        raise FlagError(str(e)) from None
    options = ServeOptions(host=value("host"), port=value("port"), metrics_port=value("metrics-port") or None,
                           http_port=value("http-port") or None,
                           max_concurrent_rpcs=value("max-concurrent-rpcs"),
                           shutdown_timeout_seconds=value("shutdown-timeout-seconds"),
                           coordinator_address=value("coordinator-address"),
                           num_processes=value("num-processes"), process_id=value("process-id"),
                           distributed_timeout_seconds=value("distributed-timeout-seconds"))
    return config, options

