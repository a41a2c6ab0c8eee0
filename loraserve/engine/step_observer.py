"""What an observer of the engine's forward passes (the server's metrics) is told of each one.

Kept apart from the step loop (engine/engine.py) so the loop reads as scheduling and tokens; the
observer sees every forward, a decode burst (engine/decode_bursts.py) as one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from loraserve.engine.sequence import Sequence

T = TypeVar("T")


@dataclass
class ForwardRecord:
    """One forward pass as an observer sees it."""

    kind: str  # "prefill" when the step admitted or recomputed prompts, else "decode"
    started: float  # time.perf_counter() at its start
    admitted: list[str]  # request ids whose first forward pass this is
    max_tokens: int  # prompt + max_new_tokens summed over the batch
    steps: int = 1  # decode steps it ran (a burst runs several)
    ok: bool = False
    seconds: float = 0.0


def observed(
    observer: Callable[[ForwardRecord], None] | None,
    decodes: list[Sequence],
    prefills: list[Sequence],
    run: Callable[[], T],
    steps: int = 1,
) -> T:
    """`run()` (a forward pass over `decodes` and `prefills`, or a burst of `steps` decode steps),
    reported to `observer` when set: once it ends, or fails (ok=False)."""
    if observer is None:
        return run()
    start = time.perf_counter()
    record = ForwardRecord(
        kind="prefill" if prefills else "decode",
        started=start,
        # first forward of a new request: not a recompute, not a later chunk of its prompt
        admitted=[seq.request_id for seq in prefills if seq.admitted_now and not seq.output_ids],
        max_tokens=sum(len(s.prompt_ids) + s.params.max_new_tokens for s in (*decodes, *prefills)),
        steps=steps,
    )
    try:
        res = run()
    except BaseException:
        observer(record)  # ok=False: the step failed
        raise
    record.ok, record.seconds = True, time.perf_counter() - start
    observer(record)
    return res
