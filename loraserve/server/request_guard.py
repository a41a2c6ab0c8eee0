"""ASGI middleware that guards every HTTP request before and while the app handles it.

Two jobs that FastAPI does not do on its own:

* **Body checks.** A POST whose `Content-Type` is not JSON gets 415 before its
  body is read, as LoRAX's router answers. The body is read up to `max_body_bytes`; a larger one is
  answered 413 without being buffered further (a declared `Content-Length`
  over the limit is refused before a byte is read), so one client cannot make
  the server hold gigabytes. A JSON body that is not UTF-8 gets a 400 naming
  that, instead of FastAPI's generic parse error.
* **Disconnects.** Once the body is read, a watcher keeps listening on the
  connection. When the client goes away (closed a stream, timed out, crashed)
  the request's task is cancelled at once, so a non-streaming `/generate` stops
  too: cancellation closes the engine generator, which aborts the request and
  frees its KV blocks and adapter slot at the next step, and releases its
  concurrency slot. Without this a timed-out client keeps its sequence
  generating until `max_new_tokens`.
* **Slow bodies.** The whole body must arrive within `body_timeout_s`; a
  client that dribbles it (slowloris on the body) gets 408 and the
  connection is closed, instead of holding a connection and a task forever.

Slow *headers* never reach the ASGI app, so `guarded_h11_protocol` adds that
deadline to uvicorn's h11 protocol: a connection must deliver a request's
headers within `header_timeout_s` of opening (or of its previous response),
else it is closed. uvicorn only times out idle keep-alive connections, and
every half-open connection counts against its `limit_concurrency`, so a few
hundred slowloris clients could otherwise make it answer 503 to everyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("loraserve.server")


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


def _error_body(path: str, message: str, error_type: str, status: int) -> bytes:
    """The same shapes as `errors.error_response` (LoRAX flat, OpenAI nested under `/v1`)."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {
            "error": {"message": message, "type": error_type, "param": None, "code": status},
            "error_type": error_type,
        }
    else:
        body = {"error": message, "error_type": error_type}
    return json.dumps(body).encode()


async def _send_error(scope: Scope, send: Send, status: int, message: str, error_type: str) -> None:
    payload = _error_body(scope.get("path", ""), message, error_type, status)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


#: Methods whose body the routes read as JSON; a request with any other Content-Type is refused.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _declares_json(scope: Scope) -> bool:
    """What axum's `Json` extractor (LoRAX's router) accepts: `application/json` or any
    `application/*+json`, parameters such as `; charset=utf-8` ignored. A missing header is not JSON."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            mime = value.decode("latin-1").split(";", 1)[0].strip().lower()
            kind, _, subtype = mime.partition("/")
            return kind == "application" and (subtype == "json" or subtype.endswith("+json"))
    return False


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int = 1 << 20, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") in _BODY_METHODS and not _declares_json(scope):
            # LoRAX answers 415 before reading the body; so do we (nothing is buffered).
            message = "Expected request with `Content-Type: application/json`"
            await _send_error(scope, send, 415, message, "unsupported_media_type")
            return
        limit = self.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _send_error(scope, send, 413, self._too_large(declared), "payload_too_large")
            return
        try:
            body, disconnected_early = await self._read_body(receive)
        except _TooLarge:
            await _send_error(scope, send, 413, self._too_large(None), "payload_too_large")
            return
        except _TooSlow:
            log.warning(
                "request to %s: body not received within %.1fs", scope.get("path"), self.body_timeout_s
            )
            message = (
                f"request body not received within {self.body_timeout_s:g}s "
                "(--body-read-timeout-s); send the whole body at once"
            )
            await _send_error(scope, send, 408, message, "request_timeout")
            return
        if disconnected_early:
            return  # the client left before sending its request: nothing to answer
        if body and _is_json(scope):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                message = (
                    f"request body is not valid UTF-8 (invalid byte at offset {e.start}); JSON must be UTF-8"
                )
                await _send_error(scope, send, 400, message, "bad_request")
                return
        await self._run(scope, receive, send, body)

    def _too_large(self, declared: int | None) -> str:
        size = f" ({declared} bytes)" if declared is not None else ""
        return f"request body{size} exceeds this server's limit of {self.max_body_bytes} bytes (--max-request-bytes)"

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        if self.body_timeout_s <= 0:
            return await self._read_body_now(receive)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_body_now(receive)
        except TimeoutError:
            raise _TooSlow from None

    async def _read_body_now(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        gone = asyncio.Event()
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, replay, send))

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    task.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # Only uvicorn cancels us: the shutdown grace period ran out. Stop the request (its
                # engine work is aborted) and end quietly; the process is on its way out anyway.
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                log.warning("request to %s cancelled: shutdown grace period exceeded", scope.get("path"))
                return
            if not gone.is_set():
                raise
            # The client is gone: its request was cancelled on purpose and nobody waits for an answer.
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await watcher


def guarded_h11_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers (`0`: none).

    The timer starts when the connection opens and again when a response completes (the
    connection then waits for its next request); it is cancelled once h11 has parsed the request
    line and headers. On expiry the connection is closed without a response: a client that takes
    that long to send a few hundred bytes of headers is either gone or attacking. Pass the class
    as `uvicorn.Config(http=...)`.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            if header_timeout_s > 0:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info(
                    "closing a connection that sent no complete request headers in %.1fs", header_timeout_s
                )
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

    return GuardedH11Protocol
