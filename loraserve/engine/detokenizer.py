"""Turn a stream of token ids into a stream of text deltas.

Decoding one token at a time is wrong in two ways: byte-level and byte-fallback
tokenizers emit multi-byte characters across several tokens (a lone token decodes
to U+FFFD), and SentencePiece-style decoders strip or merge spaces depending on
the neighbouring tokens. The prefix/read-offset technique (TGI, vLLM) fixes both:
decode a short window that starts a few tokens *before* the unread ones, and emit
only the part beyond what the already-read prefix decodes to; hold everything back
while the window's text ends in an incomplete character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Tokens of prompt context before the first generated token: enough for any decoder's
# space handling and for a 4-byte character split into single-byte tokens.
PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode_raw(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming decoder; `add` is called once per accepted token."""

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        # Only the window from the prefix offset on is kept, so memory stays O(window),
        # not O(prompt + generation).
        self._window: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_ids else []
        self._read = len(self._window)  # window[:read] is already emitted (or prompt)
        self._prefix_text: str | None = None  # decode(window[:read]); cached while tokens are held back
        self._text_parts: list[str] = []
        self._text_len = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode_raw(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is still partial)."""
        self._window.append(int(token_id))
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text) :]
        # The just-read tokens become the next prefix.
        del self._window[: self._read]
        self._read = len(self._window)
        self._prefix_text = None
        self._emit(delta)
        return delta

    def add_many(self, token_ids: Sequence[int]) -> str:
        """Several tokens accepted in one step (speculative decoding): their joint delta."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of a request, release held-back text even if it ends mid-character.

        A generation that stops inside a character (length limit, or a model that
        emitted invalid UTF-8) would otherwise lose those bytes; they come out as
        U+FFFD, which is also what a full decode of the ids gives.
        """
        if self._read == len(self._window):
            return ""
        prefix = (
            self._prefix_text if self._prefix_text is not None else self._decode(self._window[: self._read])
        )
        new_text = self._decode(self._window)
        delta = new_text[len(prefix) :] if len(new_text) > len(prefix) else ""
        del self._window[: self._read]
        self._read = len(self._window)
        self._prefix_text = None
        self._emit(delta)
        return delta

    def _emit(self, delta: str) -> None:
        self._text_parts.append(delta)
        self._text_len += len(delta)
        if len(self._text_parts) > 64:  # keep `text` O(1) amortized without an ever-growing list
            self._text_parts = ["".join(self._text_parts)]

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of `add`/`flush` results)."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    @property
    def text_len(self) -> int:
        return self._text_len

    @property
    def pending_tokens(self) -> int:
        """Tokens whose text is still held back."""
        return len(self._window) - self._read


def decode_continuation(
    tokenizer: _Decoder,
    context_ids: Sequence[int],
    new_ids: Sequence[int],
    skip_special_tokens: bool = True,
) -> str:
    """Decode `new_ids` as a continuation of `context_ids` (LoRAX's final `generated_text`).

    Decoding generated ids alone would drop the leading space SentencePiece
    decoders strip from the first token; one token of context keeps it, as TGI does.
    """
    ctx = list(context_ids[-1:])
    prefix = tokenizer.decode_raw(ctx, skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode_raw(ctx + list(new_ids), skip_special_tokens=skip_special_tokens)
    if full.startswith(prefix):
        return full[len(prefix) :]
    # The context token merged with the new ones (e.g. a split character): no clean cut exists.
    return tokenizer.decode_raw(list(new_ids), skip_special_tokens=skip_special_tokens)
