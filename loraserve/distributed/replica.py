"""The replica deployment: one engine, its adapter store and the single server's app, in one Ray actor.

Each replica builds exactly what `loraserve serve` builds (`cli.build_server`, the same flags) and
runs forwarded requests through that app in-process, so mixed-adapter batching, validation, the
per-request token check and error shapes are the single server's. What Ray adds is in front of
the app: Ray Serve's model multiplexing keeps an LRU of the adapter keys this replica holds
(`max_num_models_per_replica` = the engine's adapter slots) and reports it to the router, which
sends later requests for those adapters here. The multiplexed loader loads the adapter into the
replica's store and keeps a reference to it while the key is in that LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from loraserve.adapters.errors import AdapterError
from loraserve.distributed.forward import ForwardedRequest, ResponseHead, run_asgi
from loraserve.distributed.keys import AdapterRef, adapter_ref
from loraserve.distributed.metrics import REPLICA_HEADER, replica_counter_lines

log = logging.getLogger("loraserve.distributed")

#: The adapter the request being loaded asks for (the multiplexed loader only receives its key).
_pending: contextvars.ContextVar[AdapterRef | None] = contextvars.ContextVar(
    "loraserve_pending", default=None
)


class _Pin:
    """What the multiplexed LRU holds per key: the adapter, kept alive while the key is cached.

    Ray calls `__del__` when it evicts the key; dropping the reference lets the store's own LRU
    decide when the tensors go.
    """

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def __del__(self) -> None:
        self.adapter = None


class LoraServeReplica:
    """A Ray Serve deployment class (see `app.build_app`)."""

    async def __init__(
        self,
        serve_argv: list[str],
        hub: Any = None,
        cwd: str | None = None,
        max_adapters: int | None = None,
        report_interval_s: float = 1.0,
    ) -> None:
        from loraserve.cli import build_server, parse_serve_args

        if cwd and os.path.isdir(cwd):  # relative `local` adapter ids resolve as on the driver
            os.chdir(cwd)
        args = parse_serve_args(serve_argv)
        built = build_server(args)
        if isinstance(built, str):
            raise RuntimeError(f"loraserve replica cannot start: {built}")
        self.app, self.state = built
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # preloads --adapter-id/--preloaded-adapter-ids
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        # Ray's LRU = the engine's adapter slots unless told otherwise (a host cache holding more)
        self.slots = int(max_adapters or self.state.limits.max_active_adapters)
        self.counts = {"hits": 0, "misses": 0, "load_failures": 0}
        self.hub = hub
        self._model_id = args.model_id
        self._default_source = args.default_adapter_source or args.adapter_source

        async def load(key: str) -> _Pin:
            return await self._load(key)

        # Set up per instance: the slot count is only known once the engine has resolved it.
        self._adapters = serve.multiplexed(max_num_models_per_replica=self.slots)(load)
        self._reporter = asyncio.get_running_loop().create_task(self._report_loop(report_interval_s))
        log.info("loraserve replica %s ready: %d adapter slots", self.replica_id, self.slots)

    async def _load(self, key: str) -> _Pin:
        """Ray's multiplexed loader: runs on a miss of this replica's adapter LRU."""
        ref = _pending.get()
        if ref is None or ref.key != key:
            raise RuntimeError(f"no pending request for adapter key {key!r}")
        self.counts["misses"] += 1
        registry = self.state.registry
        if ref.merge is not None:
            adapter = await registry.resolve_merged(ref.merge, ref.source, ref.token)
        else:
            adapter = await registry.resolve(ref.adapter_id, ref.source, ref.token)
        return _Pin(adapter)

    async def _pin(self, key: str, ref: AdapterRef | None) -> None:
        """Count the request and make sure its adapter is in this replica's LRU.

        A failed load is not an error here: the app runs next, resolves the adapter again and
        answers with the single server's error (424, 401/403, ...), and nothing is cached.
        """
        if ref is None or ref.key != key:  # round-robin baseline or a key-less request: same LRU
            return
        misses = self.counts["misses"]
        token = _pending.set(ref)
        try:
            await self._adapters(key)
        except AdapterError:
            self.counts["load_failures"] += 1
        except Exception:
            self.counts["load_failures"] += 1
            log.exception("loading adapter key %s failed", key)
        finally:
            _pending.reset(token)
        if self.counts["misses"] == misses:
            self.counts["hits"] += 1

    async def handle(self, req: ForwardedRequest, key: str = "") -> AsyncIterator[ResponseHead | bytes]:
        """Run one forwarded request; yields its head, then body chunks (see `forward.run_asgi`).

        `key` is the adapter key the ingress computed, also when it routed without multiplexing
        (the baseline), so both routings load adapters through the same LRU.
        """
        ref = None
        if key:
            ref = adapter_ref(
                req.path, req.body, req.headers, model_id=self._model_id, default_source=self._default_source
            )
            await self._pin(key, ref)
        async for item in run_asgi(self.app, req):
            if isinstance(item, ResponseHead):
                item.headers.append((REPLICA_HEADER, self.replica_id))
            yield item

    async def snapshot(self) -> dict[str, Any]:
        """This replica's `/metrics` text plus its adapter LRU counters, and its `/v1/models`."""
        extra = replica_counter_lines(self.counts, self.slots, self.state.registry.stats())
        return {
            "replica": self.replica_id,
            "time": time.time(),
            "counts": dict(self.counts),
            "store": self.state.registry.stats(),
            "metrics": (await self._get("/metrics")).decode() + extra,
            "models": json.loads(await self._get("/v1/models")),
        }

    async def _get(self, path: str) -> bytes:
        body = b""
        async for item in run_asgi(self.app, ForwardedRequest("GET", path)):
            if isinstance(item, bytes):
                body += item
        return body

    async def _report_loop(self, interval_s: float) -> None:
        """Push snapshots to the metrics hub: the ingress cannot address replicas one by one."""
        while self.hub is not None:
            try:
                await self.hub.report.remote(await self.snapshot())
            except Exception as e:  # the hub restarting must not take the replica down
                log.warning("metrics report failed: %s", type(e).__name__)
            await asyncio.sleep(interval_s)

    def check_health(self) -> None:
        """Ray replaces a replica whose step loop has died."""
        thread = getattr(self.state.aengine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the engine's step loop has stopped")

    async def __del__(self) -> None:
        """Ray calls this when it stops the replica: stop the engine and the adapter store."""
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        if getattr(self, "_lifespan", None) is not None:
            with contextlib.suppress(Exception):
                await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None
