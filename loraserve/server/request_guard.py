"""ASGI middleware that guards every HTTP request before and while the app handles it.

Two jobs that FastAPI does not do on its own:

* **Body checks.** The body is read up to `max_body_bytes`; a larger one is
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


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int = 1 << 20) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
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
