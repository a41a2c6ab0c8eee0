"""A streamed chat answer split, as its text arrives, into content or one tool call's pieces.

OpenAI clients expect a streamed call as `delta.tool_calls` chunks: the first carries `index`,
`id`, `type`, `function.name` and `arguments: ""`, the following ones carry the arguments' text
as it is generated, and the finish chunk says `finish_reason: "tool_calls"`.

A call is the JSON object `{"name": <tool>, "arguments": {...}}` (server/openai_tools.py), name
first: the grammar keeps the schema's property order, and the prompt asks for that order.
`CallStream` holds the text back while it is still a possible start of such a call; once
`{"name": "<allowed tool>", "arguments": ` is complete it announces the call and then passes
on the arguments' text as it comes, up to the end of the arguments value (a small JSON scanner
finds it, so the call's closing `}` is never sent). Text that can no longer start a call is
content: the held-back text is sent first, then every delta as it comes.

With a constrained `tool_choice` ("required", a named function) the answer is a call from its
first token, so nothing waits beyond the head. With `"auto"` a free-text answer that begins like
a call waits until it stops looking like one (usually within a few tokens).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

#: `{"name": "<name>", "arguments": ` with any JSON whitespace, complete once the arguments'
#: first character is there (so whitespace before it is never sent); group 1 is the name as written.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_SPACE = re.compile(r"\s+")


class _ValueEnd:
    """Finds where one JSON value ends in text that arrives piece by piece (strings, escapes
    and nesting tracked; the text is assumed to be JSON, as the grammar makes it)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape, self.done = 0, False, False, False

    def take(self, piece: str) -> str:
        """The part of `piece` that still belongs to the value."""
        for i, c in enumerate(piece):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:  # a bare string value ends with its quote
                        self.done = True
                        return piece[: i + 1]
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]" or (c == "," and self.depth == 0):
                if self.depth == 0:  # the end of a bare number, true, false or null
                    self.done = True
                    return piece[:i]
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return piece[: i + 1]
        return piece


class CallStream:
    """Feed the answer's text deltas to `push`; it returns the chat `delta`s to send."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = allowed
        # what the head looks like with its whitespace removed, one per allowed tool
        self._heads = [f'{{"name":{json.dumps(n)},"arguments":' for n in allowed]
        self.held = ""  # text not yet decided to be content or a call
        self.mode: str | None = None  # None (undecided), "content" or "call"
        self.name: str | None = None
        self._args = _ValueEnd()

    def push(self, piece: str) -> list[dict[str, Any]]:
        if not piece:
            return []
        if self.mode == "content":
            return [{"content": piece}]
        if self.mode == "call":
            return self._arguments(piece)
        self.held += piece
        m = _HEAD.match(self.held)
        if m is not None:
            name = _string(m.group(1))
            if name in self.allowed:
                self.mode, self.name = "call", name
                call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function"}
                first = {"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]}
                return [first, *self._arguments(self.held[m.end() :])]
        squeezed = _SPACE.sub("", self.held)
        if m is None and any(h.startswith(squeezed) for h in self._heads):
            return []  # still a possible start of a call: wait
        return self.flush()

    def flush(self) -> list[dict[str, Any]]:
        """Undecided text is content (the answer ended, or it cannot start a call)."""
        if self.mode is not None:
            return []
        self.mode, text, self.held = "content", self.held, ""
        return [{"content": text}] if text else []

    def _arguments(self, piece: str) -> list[dict[str, Any]]:
        if self._args.done:
            return []
        part = self._args.take(piece)
        return [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]}] if part else []


def _string(written: str) -> str | None:
    try:
        return json.loads(f'"{written}"')
    except ValueError:
        return None
