"""Hugging Face `transformers` (+ `peft` mixed-adapter batches) as a peer.

transformers has no continuous batching, so each run is one static batch through
`generate`: base runs use the bare model, adapter runs the PEFT model with every adapter
loaded via `load_adapter` and `adapter_names=[...]` per row (PEFT's mixed-batch path).
A single-adapter run uses `set_adapter`, the fastest thing PEFT offers for it.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.metrics import RequestTiming, RunResult, summarize, write_results
from bench.spec import BenchSpec, Request, RunSpec, batch1_request, repetition

SYSTEM = "hf"
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" inside a mixed batch
PAD_ID = 0


def load_model(model_dir: str, dtype: str = "float32", device: str = "cpu"):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def _batch(requests: list[Request], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's generation starts at the same column."""
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    return ids.to(device), mask.to(device)


class _StepClock:
    """A logits processor that only marks the time: generate calls it once per new token."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(time.perf_counter())
        return scores


@torch.inference_mode()
def generate_batch(
    model, requests: list[Request], device: str = "cpu", adapter_names: list[str] | None = None
) -> tuple[list[RequestTiming], float]:
    """One static batch (all rows run to the longest max_new_tokens); per-row token marks and wall seconds.

    Rows of a static batch get each token at the same step, so they share the step marks.
    """
    from transformers import LogitsProcessorList

    ids, mask = _batch(requests, device)
    n = max(r.max_new_tokens for r in requests)
    kwargs = dict(adapter_names=adapter_names) if adapter_names is not None else {}
    clock = _StepClock()
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=PAD_ID,
        eos_token_id=None,
        logits_processor=LogitsProcessorList([clock]),
        **kwargs,
    )
    wall = time.perf_counter() - t0
    marks = [m - t0 for m in clock.marks]
    return [RequestTiming(0.0, marks[: r.max_new_tokens]) for r in requests], wall


class HfPeer:
    """Holds the model; wraps it in PEFT only once the first adapter run needs it."""

    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        self.model = load_model(spec.model_dir, spec.dtype, spec.device)
        self.names: dict[str, str] = {}

    def _ensure_adapters(self, paths: list[str]) -> None:
        from peft import PeftModel

        for path in paths:
            if path in self.names:
                continue
            name = f"a{len(self.names)}"
            if not self.names:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            else:
                self.model.load_adapter(path, adapter_name=name)
            self.names[path] = name

    def run(self, run: RunSpec) -> RunResult:
        adapters = sorted({r.adapter for r in run.requests if r.adapter is not None})
        self._ensure_adapters(adapters)
        names: list[str] | None = None
        if len(adapters) == 1 and all(r.adapter for r in run.requests):
            self.model.set_adapter(self.names[adapters[0]])
        elif adapters:
            names = [self.names[r.adapter] if r.adapter else BASE_ADAPTER for r in run.requests]
        elif self.names:  # base run after PEFT wrapping: PEFT's own "no adapter" context
            with self.model.disable_adapter():
                return self._timed(run, None)
        return self._timed(run, names)

    def _timed(self, run: RunSpec, names: list[str] | None) -> RunResult:
        warm = [Request(r.prompt_ids[:8], 2, r.adapter) for r in run.requests]
        generate_batch(self.model, warm, self.spec.device, names)
        best: RunResult | None = None
        for k in range(self.spec.repeats):  # best of k: the box is shared, slow outliers are others' load
            timings, wall = generate_batch(self.model, repetition(run.requests, k), self.spec.device, names)
            res = summarize(SYSTEM, run.name, timings, wall)
            best = res if best is None or res.tok_s > best.tok_s else best
        assert best is not None
        return best

    def batch1_decode(self) -> RunResult:
        """Decode-only rate on the bare base model: tokens after the first over the time they took."""
        cfg = self.spec.batch1_decode or {}
        req = batch1_request(self.spec)
        ctx = self.model.disable_adapter() if self.names else contextlib.nullcontext()
        with ctx:
            generate_batch(self.model, [Request(req.prompt_ids, 2)], self.spec.device)
            best: RunResult | None = None
            for _ in range(self.spec.repeats):
                timings, wall = generate_batch(self.model, [req], self.spec.device)
                res = summarize(SYSTEM, "batch1_decode", timings, wall)
                t = timings[0].token_times_s
                res.tok_s = (cfg["new_tokens"] - 1) / max(t[-1] - t[0], 1e-9)
                best = res if best is None or res.tok_s > best.tok_s else best
        assert best is not None
        return best


def run_hf(spec: BenchSpec) -> list[RunResult]:
    """Base-model runs first (bare transformers), then adapter runs under PEFT."""
    peer = HfPeer(spec)
    results = []
    if spec.batch1_decode:
        results.append(peer.batch1_decode())
    base_runs = [r for r in spec.runs if all(q.adapter is None for q in r.requests)]
    results += [peer.run(r) for r in base_runs]
    results += [peer.run(r) for r in spec.runs if r not in base_runs]
    order = {r.name: i for i, r in enumerate(spec.runs)}
    return sorted(results, key=lambda r: order.get(r.run, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description="transformers/peft baseline on a bench spec (subprocess entry)")
    ap.add_argument("spec")
    ap.add_argument("out")
    args = ap.parse_args()
    write_results(args.out, run_hf(BenchSpec.load(args.spec)))


if __name__ == "__main__":
    main()
