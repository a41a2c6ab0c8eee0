"""The `serve` flags: LoRAX's launcher names, each also read from its upper-snake-case environment variable."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Flag:
    name: str
    help: str
    type: Any = str
    default: Any = None
    kind: str = "value"  # value | list | bool
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return self.name.lstrip("-").replace("-", "_").upper()


_SCHED_HINT = "Accepted for LoRAX compatibility; loraserve's continuous-batching scheduler does not need it."
SOURCES = ("hub", "local", "s3", "pbase")

SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--model-id",
        "Base model: a local directory in Hugging Face layout (config.json, safetensors, tokenizer.json).",
        aliases=("--model",),
    ),
    Flag(
        "--source",
        "Where the base model comes from. Only local directories are served today.",
        default="hub",
        choices=("hub", "local", "s3"),
    ),
    Flag("--revision", "Base model revision (hub sources)."),
    Flag(
        "--adapter-id",
        "A static adapter loaded at start; requests that name no adapter use it. Medusa heads in it "
        "become the default speculator for every request.",
    ),
    Flag(
        "--adapter-source",
        "Source of --adapter-id (and default of the other adapter sources).",
        default="hub",
        choices=SOURCES,
    ),
    Flag(
        "--default-adapter-source",
        "Source used for a request's adapter_id when it names none (default: --adapter-source).",
        choices=SOURCES,
    ),
    Flag(
        "--preloaded-adapter-ids",
        "Adapters loaded at start to avoid cold starts (space separated; the "
        "environment variable takes commas).",
        kind="list",
    ),
    Flag(
        "--preloaded-adapter-source",
        "Source of --preloaded-adapter-ids (default: --adapter-source).",
        choices=SOURCES,
    ),
    Flag("--predibase-api-token", "Token used to preload pbase adapters (never logged)."),
    Flag("--adapter-cache-dir", "Disk cache for downloaded adapters.", default="~/.cache/loraserve/adapters"),
    Flag("--adapter-host-cache-bytes", "Host-memory budget for parsed adapters.", type=int, default=2 << 30),
    Flag(
        "--local-adapter-roots",
        "Directories `local` adapters must live under (default: any path).",
        kind="list",
    ),
    Flag(
        "--speculative-tokens",
        "Most tokens Medusa heads draft per step; 0 = as many as the --adapter-id's heads have "
        "(without Medusa heads speculation is off and only 0 is accepted).",
        type=int,
        default=0,
    ),
    Flag(
        "--dtype",
        "Weights and activations dtype.",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
    ),
    Flag("--device", "Torch device, e.g. cpu, cuda, cuda:1.", default="cpu"),
    Flag("--quantize", "Weight quantization (not supported yet)."),
    Flag("--compile", "torch.compile the model (not supported yet).", kind="bool"),
    Flag("--trust-remote-code", "Never needed: model code is built in.", kind="bool"),
    Flag(
        "--max-concurrent-requests",
        "Requests in flight beyond which the server answers 429 at once.",
        type=int,
        default=128,
    ),
    Flag(
        "--max-request-bytes",
        "Largest request body in bytes; bigger bodies get 413 before they are parsed.",
        type=int,
        default=1 << 20,
    ),
    Flag(
        "--shutdown-grace-s",
        "On SIGTERM, how long in-flight requests may finish before they are cancelled.",
        type=float,
        default=30.0,
    ),
    Flag(
        "--adapter-auth-ttl-s",
        "How long a successful private-adapter token check is reused (0: check every request).",
        type=float,
        default=5.0,
    ),
    Flag(
        "--adapter-source-timeout-s",
        "Network timeout for one adapter-source call (S3, hub, Predibase); a stalled source fails "
        "the request with 503 instead of hanging it.",
        type=float,
        default=30.0,
    ),
    Flag("--max-best-of", "Largest `best_of` a request may ask for.", type=int, default=2),
    Flag("--max-stop-sequences", "Most `stop` sequences per request.", type=int, default=4),
    Flag("--max-input-length", "Longest prompt in tokens (default: min(1024, context - 1)).", type=int),
    Flag(
        "--max-total-tokens", "Longest prompt + generation in tokens (default: min(2048, context)).", type=int
    ),
    Flag("--max-batch-prefill-tokens", "Most prompt tokens prefilled in one step.", type=int, default=4096),
    Flag(
        "--max-batch-total-tokens",
        "KV-cache capacity in tokens (default: sized from device memory).",
        type=int,
    ),
    Flag("--max-waiting-tokens", _SCHED_HINT, type=int, default=20),
    Flag("--waiting-served-ratio", _SCHED_HINT, type=float, default=1.2),
    Flag("--eager-prefill", _SCHED_HINT, kind="bool"),
    Flag("--chunked-prefill", _SCHED_HINT, kind="bool"),
    Flag("--prefix-caching", _SCHED_HINT, kind="bool"),
    Flag(
        "--max-active-adapters",
        "Adapters resident on the device at once (capped by the adapter memory budget).",
        type=int,
        default=128,
    ),
    Flag(
        "--adapter-cycle-time-s",
        "Seconds a request may wait for a free adapter slot before the longest-resident busy adapters "
        "stop taking new requests and hand their slots over (adapter exchange).",
        type=float,
        default=2.0,
    ),
    Flag(
        "--adapter-memory-fraction",
        "Share of device memory reserved for adapter weights.",
        type=float,
        default=0.1,
    ),
    Flag("--max-lora-rank", "Largest LoRA rank an adapter slot holds.", type=int, default=64),
    Flag(
        "--merge-adapter-weights",
        "Merge a static adapter into the base weights (not supported yet).",
        kind="bool",
    ),
    Flag("--hostname", "Address to listen on.", default="0.0.0.0", aliases=("--host",)),
    Flag("--port", "Port to listen on.", type=int, default=8080),
    Flag("--sharded", "Tensor parallelism (not supported: one device per server).", kind="bool"),
    Flag("--num-shard", "Number of shards (only 1 is supported).", type=int, default=1),
    Flag("--cors-allow-origin", "Origins allowed by CORS (space separated).", kind="list"),
    Flag("--otlp-endpoint", "OpenTelemetry endpoint (not supported yet)."),
    Flag("--json-output", "Log as JSON lines.", kind="bool"),
    Flag("--num-threads", "CPU threads for torch (default: torch's choice).", type=int),
    Flag(
        "--no-native-kernels",
        "CPU: run LoRA, decode attention and RMSNorm as PyTorch ops instead of the native kernels "
        "compiled for this machine (same results, slower; LORASERVE_NATIVE_KERNELS=0 does the same).",
        kind="bool",
    ),
    Flag("--log-level", "Logging level.", default="info", choices=("debug", "info", "warning", "error")),
)


def _env_value(flag: Flag) -> Any:
    raw = os.environ.get(flag.env)
    if raw is None or raw == "":
        return flag.default if flag.kind != "list" else (flag.default or [])
    if flag.kind == "bool":
        return raw.strip().lower() in _TRUE
    if flag.kind == "list":
        return [x for x in raw.replace(",", " ").split() if x]
    return flag.type(raw)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag in SERVE_FLAGS:
        names = [flag.name, *flag.aliases]
        help_text = f"{flag.help} [env: {flag.env}]"
        dest = flag.name.lstrip("-").replace("-", "_")
        default = _env_value(flag)
        if flag.kind == "bool":
            parser.add_argument(*names, dest=dest, action="store_true", default=default, help=help_text)
        elif flag.kind == "list":
            parser.add_argument(*names, dest=dest, nargs="*", default=default, help=help_text)
        else:
            if flag.default is not None:
                help_text += f" (default: {flag.default})"
            parser.add_argument(
                *names, dest=dest, type=flag.type, default=default, choices=flag.choices, help=help_text
            )
