"""One HTTP request carried from the ingress to a replica, and run there through the single
server's own FastAPI app in-process.

Why in-process ASGI instead of re-implementing routes: the replica then validates, resolves
adapters (with the token check on every request), batches and shapes errors exactly as
`loraserve serve` does, so the Ray endpoint cannot drift from the single server's API.

The replica answers as a stream of items: first a `ResponseHead` (status and headers), then the
body as `bytes` chunks, one per ASGI `http.response.body` message, so SSE events travel token
by token through Ray's `DeploymentResponseGenerator`. Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("loraserve.distributed")

#: Headers that describe one hop's framing, recomputed by whoever sends the response on.
HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


@dataclass(repr=False)
class ForwardedRequest:
    """What the ingress received, for the replica to replay.

    `repr` names only the route: Ray logs the arguments of a failed call, and the headers and
    body may carry a private adapter's token (`Authorization`, `parameters.api_token`).
    """

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"ForwardedRequest({self.method} {self.path})"


@dataclass
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]

    @property
    def is_stream(self) -> bool:
        return any(k.lower() == "content-type" and "text/event-stream" in v for k, v in self.headers)


def _scope(req: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http",
        # 2.3: Starlette's StreamingResponse then listens for `http.disconnect`, which is how a
        # cancelled forward stops the engine request (see `run_asgi`).
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "http",
        "path": req.path,
        "raw_path": req.path.encode(),
        "query_string": req.query_string,
        "root_path": "",
        "headers": list(req.headers),
        "client": req.client or ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def run_asgi(app: Any, req: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Run `req` through `app`; yields the head, then body chunks.

    Closing this generator early (the ingress's client went away, or Ray cancelled the call)
    sends `http.disconnect` and cancels the app's task, so the engine aborts the request and
    frees its KV blocks and adapter slot, as a disconnect does on the single server.
    """
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(_scope(req), receive, send)
        except Exception:  # the app has answered 500 already (Starlette's error middleware)
            log.exception("%s %s failed in the replica", req.method, req.path)
        finally:
            out.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await out.get()) is not None:
            if message["type"] == "http.response.start":
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ResponseHead(message["status"], [(k, v) for k, v in headers if k not in HOP_HEADERS])
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)
