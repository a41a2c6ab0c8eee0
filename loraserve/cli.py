"""`loraserve serve` (the HTTP server), `loraserve generate` (one generation, no server) and
`loraserve build-kernels` (compile the native CPU kernels ahead of any start)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from loraserve import __version__
from loraserve.models.source import DEFAULT_MODEL_CACHE, MODEL_SOURCES
from loraserve.server.flags import SERVE_FLAGS, SOURCES, EnvArgumentParser, add_serve_flags
from loraserve.server.log_redaction import install_redaction
from loraserve.server.logging_setup import setup_logging, uvicorn_log_config

log = logging.getLogger("loraserve")


def _unsupported(args: argparse.Namespace) -> str | None:
    """Flags whose feature does not exist yet stop the launch instead of being ignored."""
    if args.quantize:
        from loraserve.layers.precision import PrecisionError, weight_quantization

        try:
            weight_quantization(args.quantize)
        except PrecisionError as e:
            return str(e)
    if args.compile:
        return "--compile is not supported yet"
    if args.merge_adapter_weights:
        return "--merge-adapter-weights is not supported yet"
    if args.sharded or args.num_shard != 1:
        return "sharding is not supported: loraserve serves from one device"
    if args.otlp_endpoint:
        return "--otlp-endpoint is not supported yet"
    return None


def _ignored_flags(args: argparse.Namespace) -> list[str]:
    """Accepted LoRAX flags that change nothing here: said once at start, so nobody believes a
    setting took effect. Unset or `false` (where false is what happens anyway) stays silent."""
    notes = []
    if args.trust_remote_code:
        notes.append(
            "--trust-remote-code is ignored: loraserve never runs code shipped with a checkpoint "
            "(its model architectures are built in)"
        )
    if args.eager_prefill is not None:
        notes.append(
            f"--eager-prefill {str(args.eager_prefill).lower()} has no effect: every step already admits "
            "waiting prompts alongside the running decodes"
        )
    defaults = {f.name: f.default for f in SERVE_FLAGS}
    for flag, value in (
        ("--max-waiting-tokens", args.max_waiting_tokens),
        ("--waiting-served-ratio", args.waiting_served_ratio),
    ):
        if value != defaults[flag]:
            notes.append(
                f"{flag} {value} has no effect: loraserve's scheduler admits waiting requests every step "
                "(the value is only reported by /info)"
            )
    return notes


def _adapter_memory_bytes(fraction: float, device: str) -> int:
    import torch

    from loraserve.engine.config import device_memory

    return int(device_memory(torch.device(device)) * fraction)


def _engine_config(args: argparse.Namespace) -> Any:
    from loraserve.engine.engine import EngineConfig

    return EngineConfig(
        dtype=args.dtype,
        quantize=args.quantize,
        adapter_dtype=args.adapter_dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_input_length=args.max_input_length,
        max_total_tokens=args.max_total_tokens,
        max_active_adapters=args.max_active_adapters,
        max_lora_rank=args.max_lora_rank,
        adapter_cycle_time_s=args.adapter_cycle_time_s,
        num_threads=args.num_threads,
        native_kernels=not getattr(args, "no_native_kernels", False),
        adapter_memory_bytes=_adapter_memory_bytes(args.adapter_memory_fraction, args.device),
        prefix_caching=args.prefix_caching,
        chunked_prefill=args.chunked_prefill,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        decode_steps=args.decode_steps,
        grammar_backend=getattr(args, "grammar_backend", "llguidance"),
    )


def _setup_speculation(engine: Any, store: Any, args: argparse.Namespace) -> str | None:
    """Load `--adapter-id` now (the preload then hits the host cache) so Medusa heads can draft from
    the first request, and a bad flag combination stops the launch before the port opens."""
    from loraserve.adapters.errors import AdapterError
    from loraserve.server.speculation import SpeculationConfigError, configure_speculation

    static = None
    if args.adapter_id:
        token = args.predibase_api_token if args.adapter_source == "pbase" else None
        try:
            static = store.get_blocking(args.adapter_id, args.adapter_source, token)
        except AdapterError as e:
            return f"--adapter-id {args.adapter_id!r}: {e}"
    try:
        n = configure_speculation(engine, static, args.speculative_tokens)
    except (SpeculationConfigError, ValueError) as e:
        return str(e)
    if n:
        log.info("Medusa speculative decoding: %s drafts up to %d tokens per step", args.adapter_id, n)
    return None


def _refuse(args: argparse.Namespace, problem: str) -> int:
    """A launch stopped by its configuration: a log record in JSON mode (so the line is JSON too),
    the usual `error: ...` line otherwise."""
    if getattr(args, "json_output", False):
        log.error(problem)
    else:
        print(f"error: {problem}", file=sys.stderr)
    return 2


def _model_dir(args: argparse.Namespace, timeout_s: float | None = None) -> Path:
    """The base model's local directory, fetched from where `--model-id`/`--source` say."""
    from loraserve.models.source import resolve_model

    return resolve_model(
        args.model_id,
        args.source,
        args.revision,
        cache_dir=args.model_cache_dir,
        timeout_s=timeout_s,
        gguf_file=args.gguf_file,
    )


def build_server(args: argparse.Namespace) -> tuple[Any, Any] | str:
    """The FastAPI app and its `ServerState` for `serve`'s flags, or why they cannot start.

    Shared by `serve` (which runs the app under uvicorn) and the Ray Serve replicas of
    `loraserve.distributed` (which run it in-process), so both validate and answer alike.
    """
    if not args.model_id:
        return "--model-id/--model (or MODEL_ID) is required"
    problem = _unsupported(args)
    if problem:
        return problem
    for note in _ignored_flags(args):
        log.warning(note)
    # huggingface_hub reads its download timeout when imported: set it before anything imports it.
    timeout = str(max(1, math.ceil(args.adapter_source_timeout_s)))  # it wants whole seconds
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", timeout)
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", timeout)
    from loraserve.models.config import ModelLoadError

    try:
        model_dir = _model_dir(args, timeout_s=args.adapter_source_timeout_s)
    except ModelLoadError as e:
        return str(e)
    from loraserve.adapters.disk_cache import AdapterDiskCache
    from loraserve.adapters.sources import build_sources
    from loraserve.adapters.store import AdapterStore
    from loraserve.engine.async_engine import AsyncEngine
    from loraserve.engine.engine import Engine
    from loraserve.server.app import build_state, create_app
    from loraserve.server.config import ServerConfig

    try:
        aengine = AsyncEngine.build(lambda: Engine.from_pretrained(model_dir, _engine_config(args)))
    except ModelLoadError as e:
        return str(e)
    engine = aengine.engine
    config = ServerConfig(
        model_id=args.model_id,
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_bytes=args.max_request_bytes,
        adapter_timeout_s=args.adapter_source_timeout_s,
        max_best_of=args.max_best_of,
        max_prompts_per_request=args.max_prompts_per_request,
        max_stop_sequences=args.max_stop_sequences,
        max_waiting_tokens=args.max_waiting_tokens,
        waiting_served_ratio=args.waiting_served_ratio,
        default_adapter_source=args.default_adapter_source or args.adapter_source,
        adapter_id=args.adapter_id,
        adapter_source=args.adapter_source,
        preloaded_adapter_ids=list(args.preloaded_adapter_ids or []),
        preloaded_adapter_source=args.preloaded_adapter_source or args.adapter_source,
        dtype=args.dtype,
        device=args.device,
        speculative_tokens=args.speculative_tokens,
        cors_allow_origin=list(args.cors_allow_origin or []),
        max_adapter_labels=args.max_adapter_labels,
        max_listed_adapters=args.max_listed_adapters,
        body_read_timeout_s=args.body_read_timeout_s,
    )
    cache_dir = Path(args.adapter_cache_dir).expanduser()
    sources = build_sources(
        cache_dir, args.local_adapter_roots or None, timeout_s=args.adapter_source_timeout_s
    )
    # One byte budget over every download directory (hub repo folders, S3/pbase targets).
    disk_cache = AdapterDiskCache(cache_dir, args.adapter_disk_cache_bytes, args.adapter_disk_cache_grace_s)
    for source in sources.values():
        if hasattr(source, "disk_cache"):
            source.disk_cache = disk_cache
    store = AdapterStore(
        engine.model_config,
        cache_dir,
        host_cache_bytes=args.adapter_host_cache_bytes,
        default_source=config.default_adapter_source,
        sources=sources,
        auth_ttl_s=args.adapter_auth_ttl_s,
        max_rank=engine.limits.max_lora_rank,
    )
    problem = _setup_speculation(engine, store, args)
    if problem:
        store.close()
        aengine.shutdown()
        return problem
    config.speculative_tokens = engine.speculative_tokens if engine.default_speculator is not None else 0
    state = build_state(config, aengine, store)
    state.metrics.disk_stats = disk_cache.stats
    state.registry.preload_token = args.predibase_api_token
    return create_app(state), state


def serve(args: argparse.Namespace) -> int:
    redactor = setup_logging(args.log_level, args.json_output, [args.predibase_api_token])
    import uvicorn

    from loraserve.server.request_guard import guarded_h11_protocol

    built = build_server(args)
    if isinstance(built, str):
        return _refuse(args, built)
    app, _ = built
    host = args.hostname
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    log.info(
        "loraserve %s serving %s on http://%s:%d (docs: http://%s:%d/docs)",
        __version__,
        args.model_id,
        shown,
        args.port,
        shown,
        args.port,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=args.port,
            log_level=args.log_level,
            log_config=uvicorn_log_config(args.json_output),
            access_log=False,
            timeout_graceful_shutdown=args.shutdown_grace_s,
            http=guarded_h11_protocol(args.header_read_timeout_s),
            timeout_keep_alive=args.keep_alive_timeout_s,  # type: ignore[arg-type]  # used as float
            limit_concurrency=args.max_connections if args.max_connections > 0 else None,
        )
    )
    install_redaction(redactor=redactor)  # after uvicorn has set up its own handlers (text mode)
    # uvicorn re-raises the SIGTERM it handled once shut down; with a Python handler in place that
    # re-raise is a no-op, so a graceful shutdown exits 0 as process managers expect.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0


def serve_ray(args: argparse.Namespace) -> int:
    """`serve` scaled out on Ray Serve (`loraserve.distributed`): needs the `ray` extra."""
    setup_logging(args.log_level, args.json_output, [args.predibase_api_token])
    if not args.model_id:
        return _refuse(args, "--model-id/--model (or MODEL_ID) is required")
    problem = _unsupported(args)
    if problem:
        return _refuse(args, problem)
    try:
        from loraserve.distributed.app import run
    except ImportError as e:
        return _refuse(args, f"serve-ray needs Ray Serve: pip install 'loraserve[ray]' ({e})")
    return run(args)


def parse_serve_args(argv: list[str]) -> argparse.Namespace:
    """`serve`'s flags (and their environment variables) read from `argv`, exactly as `serve` reads them."""
    return build_parser().parse_args(["serve", *argv])


def generate(args: argparse.Namespace) -> int:
    """A one-off generation straight on the engine; handy to check a model or adapter without a server."""
    setup_logging("warning")
    from loraserve.adapters.errors import AdapterError
    from loraserve.adapters.store import local_adapter_store
    from loraserve.engine.engine import Engine, EngineConfig
    from loraserve.engine.params import SamplingParams
    from loraserve.models.config import ModelLoadError

    # One request: a KV cache for one sequence and one adapter slot, not the serving-sized defaults.
    config = EngineConfig(
        dtype=args.dtype,
        device=args.device,
        max_lora_rank=args.max_lora_rank,
        max_batch_total_tokens=1,
        max_active_adapters=1,
        max_num_seqs=1,
    )
    try:
        engine = Engine.from_pretrained(_model_dir(args), config)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adapter = None
    if args.adapter_id:
        try:
            adapter = asyncio.run(
                local_adapter_store(engine.model_config).get(args.adapter_id, args.adapter_source, None)
            )
        except AdapterError as e:
            print(f"error: adapter {args.adapter_id!r}: {e}", file=sys.stderr)
            return 1
        if adapter.medusa is not None:  # the adapter's heads draft; its LoRA part (if any) applies
            engine.set_default_speculator(adapter.medusa)
            adapter = adapter if adapter.modules else None
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature is not None or args.top_p is not None,
        temperature=args.temperature or 1.0,
        top_p=args.top_p or 1.0,
        seed=args.seed,
        stop=list(args.stop or []),
        ignore_eos_token=args.ignore_eos_token,
    )
    try:
        out = engine.generate([args.prompt], params, [adapter])[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out.generated_text)
    return 0


def build_kernels(args: argparse.Namespace) -> int:
    """Kept out of `serve` on purpose: a minute of compiling belongs to installing, not to a start."""
    from loraserve.layers.native_cpu import build_command

    return build_command(args.force, args.march)


def build_parser() -> argparse.ArgumentParser:
    parser = EnvArgumentParser(prog="loraserve", description="Serve one base model and many LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"loraserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser(
        "serve",
        help="Start the HTTP server (LoRAX and OpenAI APIs).",
        usage="%(prog)s --model-id DIR|ORG/NAME|S3_URI [options]  (all options: %(prog)s --help)",
    )
    add_serve_flags(p_serve)
    p_serve.set_defaults(func=serve)

    p_ray = sub.add_parser(
        "serve-ray",
        help="Serve on Ray Serve: N replicas behind one endpoint, requests routed by adapter.",
        usage="%(prog)s --model-id DIR|ORG/NAME|S3_URI --replicas N [serve options]",
    )
    add_serve_flags(p_ray)
    p_ray.add_argument("--replicas", type=int, default=2, help="Engine replicas (default: 2).")
    p_ray.add_argument(
        "--routing",
        choices=("adapter", "plain"),
        default="adapter",
        help="adapter: Ray Serve model multiplexing keyed by the adapter (default); plain: Ray's default.",
    )
    p_ray.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica.")
    p_ray.add_argument(
        "--max-adapters-per-replica",
        type=int,
        help="Adapters each replica keeps routed to it (Ray's max_num_models_per_replica; "
        "default: its adapter slots).",
    )
    p_ray.add_argument("--ray-address", help="A running Ray cluster to join (default: start a local one).")
    p_ray.set_defaults(func=serve_ray)

    p_gen = sub.add_parser("generate", help="Generate once from a prompt, without a server.")
    p_gen.add_argument("prompt", help="The prompt text.")
    p_gen.add_argument(
        "--model-id",
        "--model",
        dest="model_id",
        required=True,
        help="Base model: a local directory, a hub repo id org/name or s3://bucket/prefix.",
    )
    p_gen.add_argument(
        "--source",
        default="hub",
        choices=MODEL_SOURCES,
        help="Where --model-id is read from (as for `serve`; default: hub, which takes local directories too).",
    )
    p_gen.add_argument("--revision", help="Base model revision on the hub (default: main).")
    p_gen.add_argument("--gguf-file", help="A GGUF checkpoint inside the --model-id directory or hub repo.")
    p_gen.add_argument(
        "--model-cache-dir",
        default=DEFAULT_MODEL_CACHE,
        help="Where base models read from S3 are downloaded.",
    )
    p_gen.add_argument(
        "--adapter-id", help="A LoRA adapter (PEFT directory) to apply; Medusa heads in it speculate."
    )
    p_gen.add_argument(
        "--adapter-source",
        default="local",
        choices=SOURCES,
        help="Source of --adapter-id (only `local` without a server's adapter store).",
    )
    p_gen.add_argument("--max-new-tokens", type=int, default=32, help="Tokens to generate (default: 32).")
    p_gen.add_argument("--temperature", type=float, help="Sample at this temperature (default: greedy).")
    p_gen.add_argument("--top-p", type=float, help="Nucleus sampling mass.")
    p_gen.add_argument("--seed", type=int, help="Sampling seed.")
    p_gen.add_argument("--stop", nargs="*", help="Stop sequences.")
    p_gen.add_argument("--ignore-eos-token", action="store_true", help="Keep going past the EOS token.")
    p_gen.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p_gen.add_argument("--device", default="cpu")
    p_gen.add_argument("--max-lora-rank", type=int, default=64)
    p_gen.set_defaults(func=generate)

    p_build = sub.add_parser(
        "build-kernels",
        help="Compile the native CPU kernels for this machine (servers only load them; `make install` runs this).",
    )
    p_build.add_argument(
        "--force", action="store_true", help="Rebuild even when a build for this machine is already cached."
    )
    p_build.add_argument(
        "--march",
        help="Compile for this -march instead of $LORASERVE_NATIVE_MARCH (default: native), e.g. x86-64-v3 "
        "for the AVX2 build; servers load it when LORASERVE_NATIVE_MARCH names it.",
    )
    p_build.set_defaults(func=build_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
