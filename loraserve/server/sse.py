"""Server-Sent Events framing for both wire formats."""

from __future__ import annotations

import json
from typing import Any


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
