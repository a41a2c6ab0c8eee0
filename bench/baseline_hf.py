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

from bench.metrics import RequestTiming, RunResult, peak_rss_mb, summarize, write_results
from bench.spec import BenchSpec, Request, RunSpec

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


@torch.inference_mode()
def generate_batch(
    model, requests: list[Request], device: str = "cpu", adapter_names: list[str] | None = None
) -> float:
    """One static batch; returns wall seconds. All rows run to the longest max_new_tokens."""
    ids, mask = _batch(requests, device)
    n = max(r.max_new_tokens for r in requests)
    kwargs = dict(adapter_names=adapter_names) if adapter_names is not None else {}
    t0 = time.perf_counter()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=PAD_ID,
        eos_token_id=None,
        **kwargs,
    )
    return time.perf_counter() - t0


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
        wall = generate_batch(self.model, run.requests, self.spec.device, names)
        tokens = sum(r.max_new_tokens for r in run.requests)
        return RunResult(
            SYSTEM, run.name, len(run.requests), tokens, wall, tokens / wall, peak_rss_mb=peak_rss_mb()
        )

    def batch1_decode(self) -> RunResult:
        """Decode-only rate on the base model: (n-1) tokens over (t_n - t_1)."""
        import random

        cfg = self.spec.batch1_decode or {}
        rng = random.Random(7)
        req = Request([rng.randrange(3, self.spec.vocab_size) for _ in range(cfg["prompt_len"])], 1)
        n = cfg["new_tokens"]
        model = self.model
        ctx = model.disable_adapter() if self.names else contextlib.nullcontext()
        with ctx:
            generate_batch(model, [Request(req.prompt_ids, 2)], self.spec.device)
            t1 = generate_batch(model, [req], self.spec.device)
            tn = generate_batch(model, [Request(req.prompt_ids, n)], self.spec.device)
        decode_s = max(tn - t1, 1e-9)
        timing = RequestTiming(0.0, [t1 + decode_s * i / (n - 1) for i in range(n)])
        res = summarize(SYSTEM, "batch1_decode", [timing], tn)
        res.tok_s = (n - 1) / decode_s
        return res


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
