"""Stop-sequence detection over streamed text.

Stop sequences are matched on decoded text, not token ids, because the same string
can be tokenized many ways and often spans token boundaries. Each step only the
tail that a new match could touch is scanned (the last `max_len - 1` old characters
plus the new delta), so the cost per token is independent of the generation length.
Like LoRAX/TGI, the kept text ends *with* the stop sequence; anything a token
produced after it is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    stop: str  # the stop sequence that matched
    end: int  # index just past the match, in the coordinates of the text that was searched


class StopChecker:
    """One request's stop sequences, with an optional rolling tail for `feed`."""

    def __init__(self, stop: list[str] | tuple[str, ...] | None) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in dict.fromkeys(stop or ()) if s)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self._tail = ""  # last max_len - 1 characters fed so far

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, new_chars: int) -> StopMatch | None:
        """The first stop sequence that completes within the last `new_chars` characters of `text`.

        Matches ending earlier were already found on previous calls, so only
        occurrences ending in the new part count; among them the one that ends
        first wins, i.e. the one the model finished first.
        """
        if not self.stops or new_chars <= 0:
            return None
        n = len(text)
        new_start = n - min(new_chars, n)
        best: StopMatch | None = None
        for s in self.stops:
            # A match ending after new_start starts at or after new_start - len(s) + 1.
            i = text.find(s, max(0, new_start - len(s) + 1))
            if i >= 0:
                end = i + len(s)
                if best is None or end < best.end:
                    best = StopMatch(s, end)
        return best

    def check(self, text: str, new_chars: int) -> int | None:
        """Where to cut `text` (just past the first completed stop sequence), or None.

        The engine keeps `text[:cut]` as the generated text.
        """
        match = self.find(text, new_chars)
        return None if match is None else match.end

    def truncate(self, text: str, new_chars: int) -> str | None:
        """`text` cut right after the first completed stop sequence, or None when none completed."""
        cut = self.check(text, new_chars)
        return None if cut is None else text[:cut]

    def feed(self, delta: str) -> int | None:
        """Stateful variant for streaming: how much of `delta` to keep, or None if no stop completed.

        The caller appends `delta[:kept]` to its text and finishes the request;
        the checker only remembers the few characters a future match could need.
        """
        if not self.stops or not delta:
            return None
        window = self._tail + delta
        match = self.find(window, len(delta))
        keep_tail = self.max_len - 1
        self._tail = window[-keep_tail:] if keep_tail > 0 else ""
        if match is None:
            return None
        return match.end - (len(window) - len(delta))

    def partial_match_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop sequence.

        Streaming front-ends that must never show stop text (OpenAI style) hold
        this many characters back until the next delta decides.
        """
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
