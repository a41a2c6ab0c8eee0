"""`build_app`/`serve-ray` options become the replicas' `serve` command line (no Ray instance)."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.ray

from loraserve.cli import build_parser, parse_serve_args  # noqa: E402
from loraserve.distributed.app import build_app, serve_argv  # noqa: E402


def test_serve_argv_round_trips_every_changed_flag() -> None:
    argv = [
        "--model-id", "demo/model", "--adapter-source", "local", "--max-active-adapters", "16",
        "--preloaded-adapter-ids", "a", "b", "--json-output", "--port", "9000", "--adapter-memory-fraction", "0.5",
    ]  # fmt: skip
    args = parse_serve_args(argv)
    again = parse_serve_args(serve_argv(args))
    for name in ("model_id", "adapter_source", "max_active_adapters", "preloaded_adapter_ids", "json_output"):
        assert getattr(again, name) == getattr(args, name), name
    assert again.adapter_memory_fraction == 0.5
    assert "--port" not in serve_argv(args)  # the ingress (Ray's proxy) owns the socket


def test_serve_ray_takes_every_serve_flag_plus_its_own() -> None:
    args = build_parser().parse_args(
        ["serve-ray", "--model", "demo/model", "--replicas", "3", "--routing", "plain",
         "--max-active-adapters", "8", "--max-adapters-per-replica", "32"]
    )  # fmt: skip
    assert (args.replicas, args.routing, args.max_active_adapters) == (3, "plain", 8)
    assert args.max_adapters_per_replica == 32 and "--replicas" not in serve_argv(args)


def test_build_app_refuses_bad_options_in_the_driver() -> None:
    with pytest.raises(ValueError, match="model"):
        build_app(replicas=2)
    with pytest.raises(ValueError, match="routing"):
        build_app(model="demo/model", routing="random")
    with pytest.raises(SystemExit):  # argparse: an unknown flag
        build_app(model="demo/model", no_such_flag=1)
