"""A background loop of good requests whose answers are checked against the engine alone.

Tests that hammer the server with bad input, faults or overload run this
alongside to prove the server keeps serving everyone else correctly.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.reliability.stack import PROMPTS, Stack, good_body


def error_message(r: httpx.Response) -> str:
    """The error text of either wire shape (LoRAX flat, OpenAI nested)."""
    body = r.json()
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err)


def stream_text(r: httpx.Response) -> str | None:
    """The final `generated_text` of a LoRAX SSE body, or None when the stream ended early."""
    last = None
    for line in r.text.splitlines():
        if line.startswith("data:"):
            last = json.loads(line[len("data:") :])
    return last.get("generated_text") if last else None


@dataclass
class GoodTraffic:
    stack: Stack
    oracle: dict[tuple[str, str | None], str]
    adapters: tuple[str | None, ...] = (None, "alpha", "beta", "gamma", "delta")
    served: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> GoodTraffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def wait_served(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served < n and not self.failures and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self) -> None:
        combos = itertools.cycle(itertools.product(PROMPTS, self.adapters, (False, True)))
        with httpx.Client(base_url=self.stack.url, timeout=60) as client:
            while not self._stop.is_set():
                prompt, adapter, stream = next(combos)
                path = "/generate_stream" if stream else "/generate"
                try:
                    r = client.post(path, json=good_body(self.stack, prompt, adapter))
                except httpx.HTTPError as e:
                    self.failures.append(f"{path} {adapter}: {type(e).__name__}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{path} {adapter}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                text = stream_text(r) if stream else r.json()["generated_text"]
                if text != self.oracle[(prompt, adapter)]:
                    self.failures.append(f"{path} {adapter}: {text!r} != {self.oracle[(prompt, adapter)]!r}")
                self.served += 1
