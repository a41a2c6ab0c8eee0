"""`build_app`: the Ray Serve application (ingress → replicas, plus the metrics hub), and the
`loraserve serve-ray` command that runs it.

    # Python, or `serve run loraserve.distributed:build_app model=demo/model replicas=2 adapter_source=local`
    from ray import serve
    from loraserve.distributed import build_app
    serve.run(build_app(model="demo/model", replicas=2, adapter_source="local"), route_prefix="/")

Every key besides the ones below is a `serve` flag with dashes as underscores (`max_active_adapters=16`
is `--max-active-adapters 16`; `True` alone for a boolean flag; lists for list flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import threading
from collections.abc import Mapping
from typing import Any

from ray import serve

from loraserve.distributed.ingress import ROUTINGS, LoraServeIngress
from loraserve.distributed.metrics import MetricsHub
from loraserve.distributed.replica import LoraServeReplica
from loraserve.server.flags import SERVE_FLAGS

log = logging.getLogger("loraserve.distributed")

#: Flags that only concern the listening socket, which the ingress (Ray's proxy) owns.
_SOCKET_FLAGS = frozenset({"--hostname", "--port"})


def _flag_argv(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, list | tuple):
        return [flag, *map(str, value)] if value else []
    return [flag, str(value)]


def serve_argv(args: argparse.Namespace) -> list[str]:
    """`args` (parsed `serve` flags) back as a command line, for the replicas to parse again.

    Only values that differ from the defaults are written, so the replicas see the same
    configuration whether a value came from a flag or from its environment variable here.
    """
    argv: list[str] = []
    for flag in SERVE_FLAGS:
        if flag.name in _SOCKET_FLAGS:
            continue
        value = getattr(args, flag.name.lstrip("-").replace("-", "_"), None)
        if value is None or value == flag.default or (flag.kind == "list" and not value):
            continue
        if flag.kind == "bool":
            argv += [flag.name, "true" if value else "false"]
        else:
            argv += _flag_argv(flag.name.lstrip("-"), value)
    return argv


def build_app(config: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
    """The Ray Serve application: a `LoraServeIngress` over `replicas` `LoraServeReplica`s.

    Keys (from `config`, a `serve run` argument dict, or keyword arguments):
    `model` (required), `replicas` (2), `routing` (`adapter`: multiplexed by adapter key;
    `plain`: Ray's default routing, the benchmark's baseline), `num_cpus_per_replica` (1),
    `max_adapters_per_replica` (the keys each replica's multiplexed LRU keeps; default: its
    adapter slots, `--max-active-adapters`; more suits a host cache that holds more adapters),
    `serve_args` (a `serve` command line, string or list), and any `serve` flag.
    Relative paths (model, `local` adapters) resolve against the directory this runs in.
    """
    from loraserve.cli import parse_serve_args

    opts = {**(config or {}), **kwargs}
    model = opts.pop("model", None) or opts.pop("model_id", None)
    if not model:
        raise ValueError("build_app needs `model` (the base model: a directory, hub id or s3:// URI)")
    replicas = int(opts.pop("replicas", 2))
    routing = str(opts.pop("routing", "adapter"))
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
    num_cpus = float(opts.pop("num_cpus_per_replica", 1))
    max_adapters = opts.pop("max_adapters_per_replica", None)
    extra = opts.pop("serve_args", [])
    argv = ["--model-id", str(model), *(shlex.split(extra) if isinstance(extra, str) else list(extra))]
    for name, value in opts.items():
        argv += _flag_argv(name, value)
    args = parse_serve_args(argv)  # a bad flag fails here, in the driver, not in every replica
    return _application(args, serve_argv(args), replicas, routing, num_cpus, max_adapters)


def _application(
    args: argparse.Namespace,
    argv: list[str],
    replicas: int,
    routing: str,
    num_cpus: float,
    max_adapters: int | None = None,
) -> Any:
    hub = serve.deployment(MetricsHub, name="LoraServeMetricsHub", ray_actor_options={"num_cpus": 0}).bind()
    replica = serve.deployment(
        LoraServeReplica,
        name="LoraServeReplica",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        # the engine batches everything it is sent; its own limit answers 429 beyond this
        max_ongoing_requests=args.max_concurrent_requests,
        health_check_period_s=5,
    ).bind(argv, hub, cwd=os.getcwd(), max_adapters=max_adapters)
    ingress = serve.deployment(
        serve.ingress()(LoraServeIngress),
        name="LoraServeIngress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=args.max_concurrent_requests * max(replicas, 1),
    )
    return ingress.bind(
        replica,
        hub,
        model_id=args.model_id,
        default_source=args.default_adapter_source or args.adapter_source,
        max_request_bytes=args.max_request_bytes,
        body_timeout_s=args.body_read_timeout_s,
        routing=routing,
    )


def run(args: argparse.Namespace) -> int:
    """`loraserve serve-ray`: start (or join) Ray, serve the app on --hostname:--port until a signal."""
    import ray

    if args.ray_address:  # a running cluster keeps its own settings
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False)
    # After ray.init, whose C++ core installs a handler that aborts the process on SIGTERM.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.hostname, "port": args.port})
    app = _application(
        args,
        serve_argv(args),
        args.replicas,
        args.routing,
        args.num_cpus_per_replica,
        args.max_adapters_per_replica,
    )
    serve.run(app, name="loraserve", route_prefix="/")
    log.info(
        "loraserve on Ray Serve: %d replicas of %s on http://%s:%d (adapter routing: %s)",
        args.replicas,
        args.model_id,
        args.hostname,
        args.port,
        args.routing,
    )
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
