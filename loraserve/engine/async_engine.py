"""Drive the engine's step loop from a dedicated thread for asyncio servers.

The step loop owns the engine exclusively (no locks inside the engine); the
event loop talks to it through a command queue, and results come back to
per-request asyncio queues via `call_soon_threadsafe`. PyTorch releases the
GIL inside its kernels, so HTTP handling stays responsive while a step runs.
`AsyncEngine.build` constructs the engine on that thread too, so CPU kernels
get one OpenMP pool (see `loraserve.cpu_threads`).

Once an `AsyncEngine` runs, no other thread may drive its engine: not
`engine.generate`, `add_request`, `step`, `abort` nor `prompt_logits`. The step
loop steps whatever the engine holds, so it steals the steps of a request
added from elsewhere, whose outputs then have nowhere to go (issue 14: an
`engine.generate` beside the loop came back one token short, or never).
Reading plain attributes (`engine.config`, `model_config`, counters) is fine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.cpu_threads import use_one_omp_thread
from loraserve.engine.engine import Engine
from loraserve.engine.errors import GenerationError
from loraserve.engine.params import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    grammar: Any = None  # structured-output matcher, built before the request reaches the step loop


@dataclass
class _Abort:
    request_id: str


class _Throughput:
    """Generated tokens a second over the last `horizon` seconds of steps.

    Why a running total: the step loop records every step (hundreds a second at batch 1) and the
    rate is read only when metrics are scraped; summing the window at every step cost ~1 % of a
    batch-1 server's step (2-core Zen 4, SmolLM2-135M int8). The metrics thread reads it while
    the step loop writes: a read takes a snapshot of the window's ends, never iterates it."""

    def __init__(self, horizon: float = 5.0) -> None:
        self.horizon = horizon
        self._window: deque[tuple[float, int]] = deque()
        self._total = 0  # tokens of every step in the window

    def record(self, now: float, n: int) -> None:
        w = self._window
        w.append((now, n))
        self._total += n
        while now - w[0][0] > self.horizon:
            self._total -= w.popleft()[1]

    def rate(self, now: float) -> float:
        """Tokens after the window's first step over the time from it to the last; 0 once the
        last step is older than the horizon (an idle server generates nothing)."""
        try:
            (t0, n0), (t1, _) = self._window[0], self._window[-1]
        except IndexError:
            return 0.0
        if now - t1 > self.horizon or t1 <= t0:
            return 0.0
        return max(self._total - n0, 0) / (t1 - t0)

    @property
    def tokens_per_s(self) -> float:
        return self.rate(time.monotonic())


def _put_all(batch: list[tuple[str, asyncio.Queue, object]]) -> None:
    for _rid, sink, item in batch:
        sink.put_nowait(item)


class AsyncEngine:
    def __init__(self, engine: Engine | None = None, factory: Callable[[], Engine] | None = None) -> None:
        """Drive `engine`, or the engine `factory` builds on the step-loop thread (preferred on
        CPU: see `build`). Raises what the factory raised."""
        if (engine is None) == (factory is None):
            raise ValueError("pass exactly one of engine and factory")
        self.engine: Engine = engine  # type: ignore[assignment]  # set by the thread when factory
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._throughput = _Throughput()
        self.error: BaseException | None = None
        self._foreign_reported = False  # see _deliver_many
        self._ready = threading.Event()
        self._factory = factory
        self._thread = threading.Thread(target=self._run, name="loraserve-step-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise self.error

    @classmethod
    def build(cls, factory: Callable[[], Engine]) -> AsyncEngine:
        """Build the engine on the step-loop thread, and keep this thread's OpenMP work
        single-threaded: all CPU parallelism then lives in one thread pool."""
        use_one_omp_thread()
        return cls(factory=factory)

    # ---- event-loop side ------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoraAdapter | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield one `RequestOutput` per step until finished; closing the iterator aborts the request.

        A structured-output request's grammar matcher is built here on a worker thread (a new
        schema's lexer takes milliseconds; the llguidance tokenizer up to a second while it is
        still being built at start), so the step thread only advances matchers and fills masks.
        Likewise a request on an adapter not yet resident first has the pages of the slot it will
        load into taken on a worker thread (`AdapterSlots.prepare`), so its load on the step
        thread is only the copy (11-23 ms instead of 47-190 for a rank-16 SmolLM adapter).
        """
        rid = request_id or uuid.uuid4().hex
        sink: asyncio.Queue = asyncio.Queue()
        grammar = None
        if params.response_format is not None:  # RequestError (bad schema) raised to the caller
            grammar = await asyncio.to_thread(self.engine.grammars.matcher, params.response_format)
        slots = self.engine.runner.slots
        prepared = adapter is not None and adapter.key not in slots.key_to_slot
        if prepared:  # its slot's pages, here
            await asyncio.to_thread(slots.prepare, adapter)
        self._submit(_Add(rid, list(prompt_ids), params, adapter, sink, asyncio.get_running_loop(), grammar))
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, BaseException):
                    # refused, or failed and aborted by the step loop: nothing is left to abort,
                    # and a refused duplicate's id belongs to another request
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._submit(_Abort(rid))
            if prepared:
                slots.unprepare(adapter.key)

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def stats(self) -> dict:
        return {**self.engine.stats(), "tokens_per_s": self._throughput.tokens_per_s}

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _submit(self, cmd: _Add | _Abort) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # ---- step-loop side -------------------------------------------------------------------------
    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        self._deliver_many([(rid, item)])

    def _deliver_many(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their event loops with one wake-up per loop, not per request.

        Each wake-up schedules the loop's thread, which on a small CPU box preempts one of
        the step's compute threads; 32 of them per step made decode steps 15-30% slower.
        """
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, object]]] = {}
        for rid, item in items:
            entry = self._sinks.get(rid)
            if entry is None:
                # every request added here keeps its sink until its last output, and aborted ones
                # produce none: this one was added to the engine by another thread
                if not self._foreign_reported:
                    self._foreign_reported = True
                    log.error(
                        "the step loop stepped request %s, which was not submitted through "
                        "AsyncEngine: another thread is driving its engine, and that request's "
                        "outputs from this thread's steps are lost",
                        rid,
                    )
                continue
            sink, loop = entry
            if isinstance(item, BaseException) or item.finished:
                self._sinks.pop(rid, None)
            batches.setdefault(loop, []).append((rid, sink, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's loop is gone; nobody is listening
                for rid, _sink, _item in batch:
                    self.engine.abort(rid)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(
                        cmd.prompt_ids, cmd.params, cmd.adapter, cmd.request_id, grammar=cmd.grammar
                    )
                except Exception as e:  # validation errors go back to that caller only
                    # straight to its own sink: a duplicate id must not take over the sink of
                    # the request that already has that id
                    try:
                        cmd.loop.call_soon_threadsafe(_put_all, [(cmd.request_id, cmd.sink, e)])
                    except RuntimeError:  # the caller's loop is gone
                        pass
                    continue
                self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
            else:
                self.engine.abort(cmd.request_id)
                self._sinks.pop(cmd.request_id, None)

    def _run(self) -> None:
        if self._factory is not None:
            try:
                self.engine = self._factory()
            except BaseException as e:  # handed to the constructor, which re-raises it
                self.error = e
                self._ready.set()
                return
            self._factory = None
        self._ready.set()
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step must not kill the server silently
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            now = time.monotonic()
            self._throughput.record(now, sum(len(o.tokens) for o in outputs))
            self._deliver_many([(out.request_id, out) for out in outputs])

    def _fail_all(self, err: Exception) -> None:
        for rid in list(self._sinks):
            self.engine.abort(rid)
            self._deliver(rid, GenerationError(f"generation failed: {err}"))
