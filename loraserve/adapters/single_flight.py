"""Run one job per key at a time; callers asking for a running key share its future.

Thread-based (concurrent.futures) rather than asyncio-based so the same
in-flight table serves coroutines (via `await_shared`) and plain threads
(preloading at start-up) alike. A finished job leaves the table at once, so
a failed load is never remembered: the next request simply tries again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}

    def submit(self, key: Hashable, fn: Callable[..., T], *args: Any) -> tuple[Future, bool]:
        """Returns (future, started): `started` is False when an existing job was joined."""
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = self._executor.submit(fn, *args)
            self._inflight[key] = fut
        fut.add_done_callback(lambda f: self._forget(key, f))
        return fut, True

    def _forget(self, key: Hashable, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._inflight)


async def await_shared(fut: Future) -> Any:
    """Await a shared future without letting one cancelled waiter cancel it for the others."""
    return await asyncio.shield(asyncio.wrap_future(fut))
