"""Our engine's batch-1 decode in-process, with no server: the counterpart of llama-bench's tg64.

bench/llamacpp.py compares our *server* (one streamed request over HTTP) with both llama-server
and llama-bench; llama-bench runs llama.cpp's engine with no HTTP, no tokenizer and no event
loop, so only this figure is the engine-to-engine reading. Run as a subprocess per round (as
llama-bench is), so each reading gets a fresh process with the same thread settings, and its
memory is gone before the servers are measured again.

    python -m bench.engine_decode --model M.gguf [--threads 2] [--dtype bfloat16] [--quantize int8]
        [--prompt-tokens 128] [--new-tokens 64] [--reps 3] [--seed 0] [--adapter DIR]

`--adapter` decodes under that PEFT LoRA (a request's own adapter, as a server would run it), so
one request's adapter cost reads against the base run beside it.

Prints one JSON line: {"decode_tok_s": median over reps, "runs": [...], "step_ms": median time a
token (a decode burst's time over its tokens),
"bandwidth_gbs": read bandwidth measured in this process just before and just after the reps (the
higher of the two)}. The host's bandwidth drifts by tens of percent within minutes, so a roofline
share is only meaningful against a reading taken beside the tokens it divides.
Each rep decodes `new_tokens` greedy tokens after its own random prompt (no prefix cache); the
rate is (tokens - 1) / time from the first token to the last, as the server bench measures it.

`--paired-slices N` then adds "paired": [[tok_s, GB/s], ...], N decode calls (a burst of tokens
each) read against the bandwidth right beside them: one 64 MiB read just before and just after
each call (bench/roofline.py `PairedProbe`), kept where the two reads agree within
`--paired-agree` (their mean is the slice's bandwidth). Each measured call follows an unmeasured
one, so it never starts on a prompt's first token. The rates run a little low (each call starts
with the caches the probe evicted); the shares they give are the fair ones on a host whose free
bandwidth moves within a second, where "bandwidth_gbs" often reads a level the reps never saw.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the engine load only once the arguments parse
    from loraserve.adapters.lora_weights import LoraAdapter
    from loraserve.engine.engine import Engine
    from loraserve.engine.params import SamplingParams

# how far a burst's two probe reads may differ (a fraction of their mean) for the burst to count;
# the llama.cpp report states it beside the share
PAIRED_AGREE = 0.15


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a model directory or a .gguf file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--decode-steps", type=int, default=None, help="greedy steps a call (default: the engine's)"
    )
    ap.add_argument("--adapter", default=None, help="a PEFT LoRA directory every rep decodes under")
    ap.add_argument("--paired-slices", type=int, default=0, help="bursts read against a paired probe")
    ap.add_argument(
        "--paired-agree", type=float, default=PAIRED_AGREE, help="most the two reads may differ by"
    )
    args = ap.parse_args(argv)

    from bench.roofline import measure_bandwidth_gbs
    from loraserve.adapters.peft_format import parse_peft_adapter
    from loraserve.engine.engine import Engine, EngineConfig
    from loraserve.engine.params import SamplingParams
    from loraserve.models.source import DEFAULT_MODEL_CACHE, resolve_model

    path = resolve_model(args.model, cache_dir=DEFAULT_MODEL_CACHE)
    cfg = EngineConfig(
        dtype=args.dtype,
        quantize=args.quantize,
        num_threads=args.threads,
        prefix_caching=False,
        max_batch_total_tokens=args.prompt_tokens + args.new_tokens + 64,
        **({} if args.decode_steps is None else {"decode_steps": args.decode_steps}),
    )
    engine = Engine.from_pretrained(path, cfg)
    adapter = parse_peft_adapter(args.adapter, key=args.adapter) if args.adapter else None
    rng = random.Random(args.seed)
    vocab = engine.runner.mc.vocab_size
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos_token=True)
    runs: list[float] = []
    steps: list[float] = []
    bandwidth: list[float] = []
    for rep in range(args.reps + 1):  # the first one warms up
        if rep == 1:
            bandwidth.append(measure_bandwidth_gbs())
        engine.add_request([rng.randrange(100, vocab) for _ in range(args.prompt_tokens)], params, adapter)
        marks: list[float] = []
        tokens: list[int] = []  # emitted at each mark: a decode burst emits several at once
        while engine.has_unfinished():
            t0 = time.perf_counter()
            out = engine.step()
            n = sum(len(o.tokens) for o in out)
            if n:
                marks.append(time.perf_counter())
                tokens.append(n)
                if len(marks) > 1:
                    steps.append((marks[-1] - t0) / n)
        if rep > 0 and len(marks) > 1:
            runs.append(sum(tokens[1:]) / (marks[-1] - marks[0]))
    bandwidth.append(measure_bandwidth_gbs())
    result = {
        "decode_tok_s": statistics.median(runs),
        "runs": [round(r, 2) for r in runs],
        "step_ms": round(statistics.median(steps) * 1e3, 3),
        "bandwidth_gbs": round(max(bandwidth), 2),
    }
    if args.paired_slices > 0:
        result["paired"] = paired_slices(
            engine, params, adapter, rng, args.prompt_tokens, args.paired_slices, args.paired_agree
        )
    print(json.dumps(result))
    return 0


def paired_slices(
    engine: Engine,
    params: SamplingParams,
    adapter: LoraAdapter | None,
    rng: random.Random,
    prompt_tokens: int,
    n: int,
    agree: float,
) -> list[list[float]]:
    """[tok_s, GB/s] of up to `n` decode calls, each between two reads of a PairedProbe that agree
    within `agree` (at most 4 n tries: a host flipping levels every burst yields fewer)."""
    from bench.roofline import PairedProbe

    probe = PairedProbe()
    vocab = engine.runner.mc.vocab_size
    kept: list[list[float]] = []
    tries = 0
    while len(kept) < n and tries < 4 * n:
        engine.add_request([rng.randrange(100, vocab) for _ in range(prompt_tokens)], params, adapter)
        engine.step()  # the prompt and its first token
        while engine.has_unfinished() and len(kept) < n and tries < 4 * n:
            engine.step()  # unmeasured: the measured call never follows the prompt
            if not engine.has_unfinished():
                break
            tries += 1
            b0 = probe.read_gbs()
            t0 = time.perf_counter()
            got = sum(len(o.tokens) for o in engine.step())
            dt = time.perf_counter() - t0
            b1 = probe.read_gbs()
            if got and abs(b0 - b1) <= agree * (b0 + b1) / 2:
                kept.append([round(got / dt, 2), round((b0 + b1) / 2, 2)])
        while engine.has_unfinished():  # finish the request unmeasured
            engine.step()
    return kept


if __name__ == "__main__":
    raise SystemExit(main())
