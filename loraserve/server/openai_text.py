"""Text post-processing the OpenAI API expects and LoRAX does not do: stop sequences are cut off."""

from __future__ import annotations


def cut_at_stop(text: str, stops: list[str]) -> str:
    """OpenAI never returns the stop sequence; LoRAX's engine keeps it, so cut at the first one."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if s and i != -1:
            cut = min(cut, i)
    return text[:cut]


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might start a stop sequence and must wait for the next token."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


class StopAwareText:
    """Streams text deltas while never emitting (part of) a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.full = ""
        self.sent = 0

    def push(self, piece: str) -> str:
        self.full += piece
        visible = cut_at_stop(self.full, self.stops)
        if len(visible) < len(self.full):  # a stop sequence appeared: nothing after it is shown
            end = len(visible)
        else:
            end = len(self.full) - held_back(self.full, self.stops)
        delta = self.full[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta

    def finish(self, stopped_by_sequence: bool) -> str:
        final = cut_at_stop(self.full, self.stops) if stopped_by_sequence or self.stops else self.full
        delta = final[self.sent :]
        self.sent = len(final)
        return delta
