"""The ingress deployment: the single server's HTTP API at one endpoint, in front of N replicas.

It does no API work of its own: it reads the body (bounded and guarded by the single server's
`RequestGuard`), computes the adapter key (`keys.adapter_ref`) and forwards the raw request to a
replica with `handle.options(multiplexed_model_id=key)`, so Ray Serve routes it to a replica that
already holds that adapter. The replica's answer comes back as a stream (head, then body chunks),
so `/generate_stream` and OpenAI streams are relayed token by token.

A replica that dies or fails before answering gives a 503 with `Retry-After` (in the route's error
shape); a stream it was serving ends with an error event of type `unavailable`. Ray replaces the
replica and routes new requests to the live ones.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraserve.distributed.forward import ForwardedRequest, ResponseHead
from loraserve.distributed.keys import adapter_ref
from loraserve.distributed.metrics import aggregate
from loraserve.server.errors import error_response
from loraserve.server.request_guard import RequestGuard
from loraserve.server.sse import lorax_event, openai_event

log = logging.getLogger("loraserve.distributed")

ROUTINGS = ("adapter", "plain")
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
_UNAVAILABLE = "the replica serving this request failed or was stopped; retry the request"


class LoraServeIngress:
    """A Ray Serve deployment class, wrapped by `serve.ingress()` in `app.build_app`."""

    def __init__(
        self,
        replica: Any,
        hub: Any,
        *,
        model_id: str,
        default_source: str,
        max_request_bytes: int,
        body_timeout_s: float,
        routing: str = "adapter",
    ) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, not {routing!r}")
        self.replica = replica
        self.hub = hub
        self.model_id = model_id
        self.default_source = default_source
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.routing = routing
        self.counts = {"unavailable": 0}

    def __serve_build_asgi_app__(self) -> Any:
        app = Starlette(
            routes=[
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/{path:path}", self.forward, methods=_METHODS),
            ]
        )
        app.add_middleware(
            RequestGuard, max_body_bytes=self.max_request_bytes, body_timeout_s=self.body_timeout_s
        )
        return app

    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics labelled by replica; JSON (per-replica counters) on request."""
        snapshots = await self.hub.collect.remote() if self.hub is not None else []
        if "application/json" in request.headers.get("accept", ""):
            replicas = [{k: s[k] for k in ("replica", "counts", "store")} for s in snapshots]
            return JSONResponse({"replicas": replicas, "ingress": self.counts})
        return Response(aggregate(snapshots, self.counts), media_type="text/plain; version=0.0.4")

    async def models(self, request: Request) -> Response:
        """The union of the replicas' lists: each lists only the adapters it served itself."""
        snapshots = await self.hub.collect.remote() if self.hub is not None else []
        if not snapshots:
            return await self.forward(request)
        data: dict[str, Any] = {}
        for snap in snapshots:
            for entry in snap["models"]["data"]:
                data.setdefault(entry["id"], entry)
        return JSONResponse({"object": "list", "data": list(data.values())})

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        req = ForwardedRequest(
            method=request.method,
            path=request.url.path,
            query_string=request.scope.get("query_string", b""),
            headers=list(request.scope.get("headers", [])),
            body=body,
            client=tuple(request.scope["client"]) if request.scope.get("client") else None,  # type: ignore[arg-type]
        )
        ref = adapter_ref(
            req.path, body, req.headers, model_id=self.model_id, default_source=self.default_source
        )
        key = ref.key if ref is not None else ""
        options: dict[str, Any] = {"stream": True}
        if key and self.routing == "adapter":
            options["multiplexed_model_id"] = key
        gen = self.replica.options(**options).handle.remote(req, key)
        try:
            head = await gen.__anext__()
            if not isinstance(head, ResponseHead):
                raise RuntimeError("the replica answered without a response head")
            if head.is_stream:
                return StreamingResponse(
                    self._relay(gen, req.path), status_code=head.status, headers=dict(head.headers)
                )
            content = b"".join([chunk async for chunk in gen])
        except Exception as e:  # the replica died, was stopped, or failed outside the app
            gen.cancel()
            return self._unavailable(request, e)
        except BaseException:  # the client went away (RequestGuard cancels us): abort the request
            gen.cancel()
            raise
        return Response(content, status_code=head.status, headers=dict(head.headers))

    def _unavailable(self, request: Request, e: BaseException) -> Response:
        self.counts["unavailable"] += 1
        log.warning("%s %s: replica unavailable (%s)", request.method, request.url.path, type(e).__name__)
        return error_response(request, _UNAVAILABLE, "unavailable", 503, {"Retry-After": "1"})

    async def _relay(self, gen: Any, path: str) -> AsyncIterator[bytes]:
        """Body chunks as they come; a replica lost mid-stream ends it with an error event."""
        done = False
        try:
            async for chunk in gen:
                yield chunk
            done = True
        except Exception as e:
            self.counts["unavailable"] += 1
            log.warning("%s: replica lost mid-stream (%s)", path, type(e).__name__)
            if path.startswith("/v1/"):
                error = {"message": _UNAVAILABLE, "type": "unavailable", "param": None, "code": 503}
                yield openai_event({"error": error}).encode()
            else:
                yield lorax_event({"error": _UNAVAILABLE, "error_type": "unavailable"}).encode()
            done = True
        finally:
            if not done:  # the client went away: cancel the replica's call, aborting the request
                gen.cancel()
