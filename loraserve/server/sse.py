"""Server-Sent Events framing for both wire formats."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def lorax_event(payload: dict[str, Any]) -> str:
    """LoRAX/TGI write `data:{json}` with no space; `lorax-client` strips exactly that prefix."""
    return f"data:{json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def openai_event(payload: dict[str, Any] | str) -> str:
    body = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    )
    return f"data: {body}\n\n"


OPENAI_DONE = openai_event("[DONE]")


class SlotStreamingResponse(StreamingResponse):
    """An SSE response that gives back its concurrency slot however the stream ends.

    The body generator's own `finally` cannot do it: a client that leaves before
    the first event is sent gets the response cancelled while the generator has
    not started, and an unstarted generator's `finally` never runs. Closing the
    generator here also aborts its engine request right away instead of at
    garbage collection.
    """

    def __init__(
        self,
        content: AsyncIterator[str],
        release: Callable[[], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})}
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(BaseException):
                    await aclose()
            self._release()
