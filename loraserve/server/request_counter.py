"""Count every HTTP request by route and status (`loraserve_request_total`).

A plain ASGI middleware, not FastAPI's `@app.middleware("http")`: that one (Starlette's
`BaseHTTPMiddleware`) passes every body chunk of a streamed response through an anyio memory
stream and a task switch, which a token stream pays once per token on the event loop, the
thread that competes with the step loop's kernels for the CPU. Here a chunk costs one extra
`await`.
"""

from __future__ import annotations

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestCounter:
    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            # the router writes the matched route into this same scope; a handler that raised
            # before answering is a 500 (what the error middleware above us sends)
            path = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route=path, status=str(status or 500)).inc()
