"""The `serve` flags: LoRAX's launcher names, each also read from its upper-snake-case environment
variable, which is checked exactly like the flag (type, choices, booleans)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BOOL_HINT = "use one of " + ", ".join(_TRUE + _FALSE)


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


_SCHED_HINT = (
    "Accepted for LoRAX compatibility but has no effect (a warning at start says so when it is changed): "
    "every step already admits waiting prompts alongside the running decodes."
)
SOURCES = ("hub", "local", "s3", "pbase")

SERVE_FLAGS: tuple[Flag, ...] = (
    Flag(
        "--model-id",
        "Base model: a local directory in Hugging Face layout (config.json, safetensors, tokenizer.json), "
        "a hub repo id org/name (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME apply) or s3://bucket/prefix.",
        aliases=("--model",),
    ),
    Flag(
        "--source",
        "Where --model-id is read from: `hub` (a local directory if one exists at that path, else a hub "
        "repo), `local` (a directory only) or `s3` (s3://bucket/prefix, standard AWS environment).",
        default="hub",
        choices=("hub", "local", "s3"),
    ),
    Flag("--revision", "Base model revision on the hub: branch, tag or commit (default: main)."),
    Flag(
        "--gguf-file",
        "A GGUF checkpoint inside the --model-id directory or hub repo (a --model-id ending in .gguf needs none).",
    ),
    Flag(
        "--model-cache-dir",
        "Where base models read from S3 are downloaded, and the config/tokenizer read from GGUF files "
        "are written (hub models go to the Hugging Face cache).",
        default="~/.cache/loraserve/models",
    ),
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
    Flag(
        "--adapter-disk-cache-bytes",
        "Disk budget for downloaded hub, S3 and pbase adapters; least recently used ones are deleted "
        "beyond it (never one being loaded). 0: unbounded.",
        type=int,
        default=20 << 30,
    ),
    Flag(
        "--adapter-disk-cache-grace-s",
        "Seconds after its download or last use during which an adapter is never evicted from disk "
        "(its files are being parsed).",
        type=float,
        default=10.0,
    ),
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
        "--grammar-backend",
        "Structured output (response_format, tools): llguidance, or xgrammar if installed "
        "(pip install 'loraserve[xgrammar]'; README compares the two).",
        default="llguidance",
        choices=("llguidance", "xgrammar"),
    ),
    Flag(
        "--dtype",
        "Weights dtype. On CPU under bfloat16 activations stay float32 (native kernels convert the weights "
        "in registers) except in GEMMs of 8+ rows on CPUs with bf16 dot products, which round them to bf16; "
        "with --quantize int8 it makes the int8 weights those of a bf16 model, the same way.",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
    ),
    Flag("--device", "Torch device, e.g. cpu, cuda, cuda:1.", default="cpu"),
    Flag(
        "--quantize",
        "int8: 8-bit weight-only, per output channel, quantised at load (LoRAX's bitsandbytes and eetq mean "
        "the same), float32 activations unless --dtype bfloat16; other LoRAX methods (gptq, awq, fp8, "
        "bitsandbytes-nf4, ...) are refused at start.",
    ),
    Flag(
        "--adapter-dtype",
        "dtype of the LoRA adapters' weights and deltas (default: --dtype).",
        choices=("float32", "bfloat16"),
    ),
    Flag(
        "--kv-cache-dtype",
        "dtype of the KV cache. auto: bf16 for low-precision weights on CPU (--dtype bfloat16, --quantize int8), "
        "else the activations' dtype; "
        "bfloat16 halves the cache's memory and the bytes attention reads, at bf16 rounding of keys and values.",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
    ),
    Flag("--compile", "torch.compile the model (not supported yet).", kind="bool"),
    Flag(
        "--trust-remote-code",
        "Ignored, with a warning: loraserve never runs code from a checkpoint; its architectures are built in.",
        kind="bool",
    ),
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
        "--header-read-timeout-s",
        "Seconds a connection may take to send a request's headers (from opening, or from its previous "
        "response); slower ones are closed (slowloris). 0: no deadline.",
        type=float,
        default=10.0,
    ),
    Flag(
        "--body-read-timeout-s",
        "Seconds a request may take to send its whole body; slower ones get 408 and are closed. 0: no deadline.",
        type=float,
        default=30.0,
    ),
    Flag(
        "--keep-alive-timeout-s",
        "Seconds an idle keep-alive connection stays open between requests.",
        type=float,
        default=5.0,
    ),
    Flag(
        "--max-connections",
        "Open connections (and requests being handled) beyond which new requests get 503 at once, "
        "so half-open clients cannot exhaust the server.",
        type=int,
        default=512,
    ),
    Flag(
        "--max-adapter-labels",
        "Per-adapter Prometheus series (by canonical adapter id, busiest kept); the rest are summed "
        'under adapter_id="other".',
        type=int,
        default=100,
    ),
    Flag(
        "--max-listed-adapters",
        "Recently served public adapters /v1/models lists besides the base model and the "
        "--adapter-id/--preloaded-adapter-ids ones (adapters loaded with a caller's token are never listed).",
        type=int,
        default=100,
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
    Flag(
        "--max-best-of",
        "Largest `best_of` a request may ask for; also the largest OpenAI `n` (choices per prompt).",
        type=int,
        default=2,
    ),
    Flag(
        "--max-prompts-per-request",
        "Most prompts one /v1/completions request may carry (a list of prompts); each prompt's `n` "
        "choices count against --max-concurrent-requests.",
        type=int,
        default=16,
    ),
    Flag("--max-stop-sequences", "Most `stop` sequences per request.", type=int, default=4),
    Flag("--max-input-length", "Longest prompt in tokens (default: min(1024, context - 1)).", type=int),
    Flag(
        "--max-total-tokens", "Longest prompt + generation in tokens (default: min(2048, context)).", type=int
    ),
    Flag("--max-batch-prefill-tokens", "Most prompt tokens prefilled in one step.", type=int, default=4096),
    Flag(
        "--max-batch-total-tokens",
        "KV-cache capacity in tokens, reserved at start (default: two sequences of --max-total-tokens, "
        "at least --max-batch-prefill-tokens; never sized from free memory).",
        type=int,
    ),
    Flag("--max-waiting-tokens", _SCHED_HINT, type=int, default=20),
    Flag("--waiting-served-ratio", _SCHED_HINT, type=float, default=1.2),
    Flag("--eager-prefill", _SCHED_HINT, kind="bool"),
    Flag(
        "--chunked-prefill",
        "Feed long prompts in chunks of at most --prefill-chunk-tokens beside the running decodes, "
        "so a long prompt never stalls the streams already generating (default: false).",
        kind="bool",
        default=False,
    ),
    Flag(
        "--decode-steps",
        "Decode steps run back to back in one native call while no request waits and no request "
        "needs Python between its steps (top-k / top-p / typical-p, other logits processors, "
        "alternatives, Medusa, grammars; greedy rows and rows sampled at a temperature alone "
        "burst): each burst's tokens stream together (default: 4; 1: one step at a time).",
        type=int,
        default=4,
    ),
    Flag(
        "--prefill-chunk-tokens",
        "Prompt tokens per step with --chunked-prefill (default: --max-batch-prefill-tokens).",
        type=int,
    ),
    Flag(
        "--prefix-caching",
        "Reuse the KV blocks of prompt prefixes computed before for the same adapter (or the base "
        "model) instead of computing them again (default: true).",
        kind="bool",
        default=True,
    ),
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


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(raw)


def _bool_arg(raw: str) -> bool:
    """`--prefix-caching true` as LoRAX's launcher takes it (a bare `--prefix-caching` means true)."""
    try:
        return parse_bool(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid boolean value: {raw!r} ({_BOOL_HINT})") from None


def _env_value(flag: Flag, raw: str) -> Any:
    """`raw` (set, not empty) as the flag would take it; ValueError says what is wrong, like argparse."""
    if flag.kind == "bool":
        try:
            return parse_bool(raw)
        except ValueError:
            raise ValueError(f"invalid boolean value: {raw!r} ({_BOOL_HINT})") from None
    if flag.kind == "list":
        return [x for x in raw.replace(",", " ").split() if x]
    try:
        value = flag.type(raw.strip())
    except (TypeError, ValueError):
        raise ValueError(f"invalid {getattr(flag.type, '__name__', 'value')} value: {raw!r}") from None
    if flag.choices is not None and value not in flag.choices:
        allowed = ", ".join(repr(c) for c in flag.choices)
        raise ValueError(f"invalid choice: {raw!r} (choose from {allowed})")
    return value


class _FromEnv:
    """Default of every serve flag until parsing ends: the flag was not given, so its environment
    variable (or else the flag's own default) decides, checked like the flag itself would be."""

    def __repr__(self) -> str:
        return "<from environment>"


_FROM_ENV = _FromEnv()


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose serve flags fall back to their environment variables.

    The variables are read when parsing, not when the parser is built, so `loraserve generate` or
    `--help` never trip over a bad `LOG_LEVEL`, and a flag given on the command line wins over its
    variable; a bad value is a usage error (exit 2) that names the variable, never a traceback.
    Subparsers created from it share the class (argparse's default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.env_flags: list[tuple[str, Flag]] = []

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for dest, flag in self.env_flags:
            if getattr(namespace, dest, None) is not _FROM_ENV:
                continue
            raw = os.environ.get(flag.env)
            if raw is None or raw.strip() == "":
                value = flag.default if flag.kind != "list" else list(flag.default or [])
            else:
                try:
                    value = _env_value(flag, raw)
                except ValueError as e:
                    self.error(f"environment variable {flag.env} (for {flag.name}): {e}")
            setattr(namespace, dest, value)
        return namespace, extras


def add_serve_flags(parser: EnvArgumentParser) -> None:
    if not isinstance(parser, EnvArgumentParser):
        raise TypeError("serve flags need an EnvArgumentParser: it reads their environment variables")
    for flag in SERVE_FLAGS:
        names = [flag.name, *flag.aliases]
        help_text = f"{flag.help} [env: {flag.env}]"
        dest = flag.name.lstrip("-").replace("-", "_")
        parser.env_flags.append((dest, flag))
        if flag.kind == "bool":
            parser.add_argument(
                *names,
                dest=dest,
                nargs="?",
                const=True,
                type=_bool_arg,
                default=_FROM_ENV,
                metavar="BOOL",
                help=help_text,
            )
        elif flag.kind == "list":
            parser.add_argument(*names, dest=dest, nargs="*", default=_FROM_ENV, help=help_text)
        else:
            if flag.default is not None:
                help_text += f" (default: {flag.default})"
            parser.add_argument(
                *names, dest=dest, type=flag.type, default=_FROM_ENV, choices=flag.choices, help=help_text
            )
