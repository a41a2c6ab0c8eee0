"""Prefix caching and chunked prefill, measured side by side in one run (issue 19).

On the SmolLM-135M shape (random weights, fp32; `bench/shapes.py`), through the engine
in-process, stepping it directly so every token gets the wall-clock time of the step that
produced it. Each pair runs the same requests on two fresh engines that differ only in the
feature measured (same KV memory), and checks their greedy outputs are identical:

- **shared prefix**: 8 adapters x 16 requests, a 1,024-token system prompt per adapter + 32
  unique tokens, 64 new tokens, all submitted at once: p50 time to first token and output
  throughput, caching on vs off (targets: TTFT >= 5x lower, throughput >= 1.5x);
- **multi-turn chat**: 32 conversations x 4 turns, each turn resending the whole history (the
  previous prompt + answer + a new user message): total time on vs off (target >= 2x lower);
- **long prompt arrival**: 31 streams decoding, one 4,096-token prompt arrives: the streams'
  p99 inter-token latency while it is prefilled against their steady-state p50, with chunked
  prefill (target <= 2x) and without;
- **cache-hostile**: unique prompts only: throughput with caching on / off (target >= 0.97);
  the pair alternates on/off and keeps the best of `--repeats` (the box is shared).

    python -m bench.prefix_cache            # full size (also run by `make bench`)
    python -m bench.prefix_cache --quick    # small sizes, a smoke run of a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.metrics import percentile
from bench.shapes import DEFAULT_CACHE, build_adapters, build_model, random_prompt
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams


@dataclass
class Sizes:
    adapters: int = 8
    per_adapter: int = 16
    system_tokens: int = 1024
    unique_tokens: int = 32
    new_tokens: int = 64
    conversations: int = 32
    turns: int = 4
    chat_system: int = 256
    chat_user: int = 64
    chat_answer: int = 32
    streams: int = 31
    stream_prompt: int = 128
    long_prompt: int = 4096
    chunk_tokens: int = 16
    hostile_requests: int = 32
    hostile_prompt: int = 512
    hostile_new: int = 32
    repeats: int = 2
    kv_gib: float = 2.0


QUICK = Sizes(
    adapters=2,
    per_adapter=4,
    system_tokens=256,
    new_tokens=16,
    conversations=4,
    turns=3,
    chat_system=128,
    chat_user=32,
    chat_answer=16,
    streams=7,
    long_prompt=1024,
    hostile_requests=16,
    hostile_prompt=256,
    hostile_new=16,
    repeats=2,
    kv_gib=0.5,
)


@dataclass
class Req:
    prompt: list[int]
    new_tokens: int
    adapter: LoraAdapter | None = None


class Timed:
    """Drives an engine step by step; token times per request id, relative to `start`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.start = time.perf_counter()
        self.submitted: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.done: set[str] = set()

    def add(self, r: Req) -> str:
        params = SamplingParams(max_new_tokens=r.new_tokens, ignore_eos_token=True)
        rid = self.engine.add_request(r.prompt, params, r.adapter)
        self.submitted[rid], self.times[rid], self.tokens[rid] = self.now(), [], []
        return rid

    def now(self) -> float:
        return time.perf_counter() - self.start

    def step(self) -> list[str]:
        """One engine step; returns the ids that finished in it."""
        outs = self.engine.step()
        t = self.now()
        finished = []
        for o in outs:
            self.times[o.request_id].extend([t] * len(o.tokens))
            self.tokens[o.request_id].extend(tok.id for tok in o.tokens)
            if o.finished:
                self.done.add(o.request_id)
                finished.append(o.request_id)
        return finished

    def run(self) -> float:
        while self.engine.has_unfinished():
            self.step()
        return self.now()

    def ttfts(self) -> list[float]:
        return [self.times[r][0] - self.submitted[r] for r in self.submitted if self.times[r]]


def long_context(model: Path) -> Path:
    """The same checkpoint with a 8,192-token context (SmolLM's is 2,048, too short for the
    4,096-token prompt): config.json rewritten, weights and tokenizer linked, nothing recomputed."""
    out = model.with_name(model.name + "-ctx8k")
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in model.iterdir():
            if f.name != "config.json" and not (out / f.name).exists():
                (out / f.name).symlink_to(f.resolve())
        cfg = json.loads((model / "config.json").read_text())
        cfg["max_position_embeddings"] = 8192
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def make_engine(model: Path, sizes: Sizes, caching: bool, chunk: int | None = None, **kw) -> Engine:
    cfg = EngineConfig(
        kv_cache_memory_bytes=int(sizes.kv_gib * (1 << 30)),
        max_total_tokens=kw.pop("max_total_tokens", 4096 + 256),
        max_input_length=kw.pop("max_input_length", 4096 + 128),
        max_lora_rank=16,
        max_active_adapters=16,  # every adapter keeps a slot: no slot cycling in either run
        adapter_memory_bytes=512 << 20,
        prefix_caching=caching,
        chunked_prefill=chunk is not None,
        prefill_chunk_tokens=chunk,
        # one step at a time: the pairs time each token's step (inter-token latency), and a decode
        # burst (engine/decode_bursts.py) streams its tokens together
        decode_steps=kw.pop("decode_steps", 1),
        **kw,
    )
    return Engine.from_pretrained(model, cfg)


def _warm(engine: Engine, adapters: list[LoraAdapter | None], vocab: int) -> None:
    """Adapter slots loaded and kernels warm before anything is timed; its prompts share nothing
    with the timed ones."""
    rng = random.Random(999)
    t = Timed(engine)
    for a in adapters:
        t.add(Req(random_prompt(rng, 40, vocab), 2, a))
    t.run()


def shared_prefix(model: Path, adapters: list[LoraAdapter], vocab: int, s: Sizes) -> dict:
    rng = random.Random(1)
    systems = [random_prompt(rng, s.system_tokens, vocab) for _ in adapters]
    reqs = [
        Req(systems[i] + random_prompt(rng, s.unique_tokens, vocab), s.new_tokens, adapters[i])
        for _ in range(s.per_adapter)
        for i in range(len(adapters))
    ]
    out: dict = {}
    outputs = {}
    for caching in (False, True):
        e = make_engine(model, s, caching)
        _warm(e, list(adapters), vocab)
        t = Timed(e)
        ids = [t.add(r) for r in reqs]
        wall = t.run()
        outputs[caching] = [t.tokens[i] for i in ids]
        tag = "on" if caching else "off"
        out[f"ttft_p50_s_{tag}"] = percentile(t.ttfts(), 50)
        out[f"tok_s_{tag}"] = sum(len(v) for v in outputs[caching]) / wall
        out[f"hits_{tag}"] = e.stats()["prefix_cache_hits"]
        del e
    out["ttft_ratio"] = out["ttft_p50_s_off"] / out["ttft_p50_s_on"]
    out["throughput_ratio"] = out["tok_s_on"] / out["tok_s_off"]
    out["identical"] = outputs[False] == outputs[True]
    return out


def multi_turn(model: Path, adapters: list[LoraAdapter], vocab: int, s: Sizes) -> dict:
    rng = random.Random(2)
    system = random_prompt(rng, s.chat_system, vocab)
    users = [[random_prompt(rng, s.chat_user, vocab) for _ in range(s.turns)] for _ in range(s.conversations)]
    out: dict = {}
    outputs = {}
    for caching in (False, True):
        e = make_engine(model, s, caching)
        _warm(e, list(adapters), vocab)
        t = Timed(e)
        history = [list(system) for _ in range(s.conversations)]
        turn = [0] * s.conversations
        owner: dict[str, int] = {}

        def ask(
            c: int, t: Timed = t, history: list = history, turn: list = turn, owner: dict = owner
        ) -> None:
            history[c] += users[c][turn[c]]
            owner[t.add(Req(list(history[c]), s.chat_answer, adapters[c % len(adapters)]))] = c

        for c in range(s.conversations):
            ask(c)
        while e.has_unfinished():
            for rid in t.step():
                c = owner[rid]
                history[c] += t.tokens[rid]
                turn[c] += 1
                if turn[c] < s.turns:
                    ask(c)
        tag = "on" if caching else "off"
        out[f"total_s_{tag}"] = t.now()
        out[f"hits_{tag}"] = e.stats()["prefix_cache_hits"]
        outputs[caching] = history
        del e
    out["time_ratio"] = out["total_s_off"] / out["total_s_on"]
    out["identical"] = outputs[False] == outputs[True]
    return out


def long_arrival(model: Path, vocab: int, s: Sizes) -> dict:
    """Steady-state ITL of the streams (steps after all of them decode, before the arrival)
    against their ITL while the long prompt is prefilled (from its arrival to its first token)."""
    rng = random.Random(3)
    streams = [random_prompt(rng, s.stream_prompt, vocab) for _ in range(s.streams)]
    long_prompt = random_prompt(rng, s.long_prompt, vocab)
    steady_steps = 20
    budget = steady_steps + s.long_prompt // s.chunk_tokens + 20
    out: dict = {}
    for chunk in (None, s.chunk_tokens):
        e = make_engine(model, s, False, chunk)
        _warm(e, [None], vocab)
        t = Timed(e)
        ids = [t.add(Req(p, budget)) for p in streams]
        while any(len(t.times[i]) < steady_steps for i in ids):
            t.step()
        arrival = t.now()
        late = t.add(Req(long_prompt, 4))
        while not t.times[late]:
            t.step()
        first = t.times[late][0]
        while e.has_unfinished():  # the streams are not needed further
            for rid in list(t.submitted):
                if rid not in t.done:
                    e.abort(rid)
                    t.done.add(rid)
        # steady state: every stream decoding, no prompt being fed (with chunking the streams' own
        # prompts are fed over many steps, and those steps must not count as steady)
        all_decoding = max(t.times[i][0] for i in ids)
        steady = [
            b - a
            for i in ids
            for a, b in zip(t.times[i], t.times[i][1:])
            if a >= all_decoding and b <= arrival
        ]
        during = [b - a for i in ids for a, b in zip(t.times[i], t.times[i][1:]) if arrival < b <= first]
        tag = f"chunk{chunk}" if chunk else "whole"
        p50, p99 = percentile(steady, 50), percentile(during, 99)
        out[f"steady_itl_p50_ms_{tag}"] = p50 * 1e3
        out[f"prefill_itl_p99_ms_{tag}"] = p99 * 1e3
        out[f"itl_ratio_{tag}"] = p99 / p50
        out[f"long_ttft_s_{tag}"] = first - arrival
        del e
    # the stricter reading: chunked steps against the unchunked engine's steady decode step
    c = f"chunk{s.chunk_tokens}"
    out[f"itl_ratio_{c}_vs_whole_steady"] = out[f"prefill_itl_p99_ms_{c}"] / out["steady_itl_p50_ms_whole"]
    return out


def cache_hostile(model: Path, adapters: list[LoraAdapter], vocab: int, s: Sizes) -> dict:
    best: dict[bool, float] = {}
    outputs = {}
    engines = {c: make_engine(model, s, c) for c in (False, True)}
    for e in engines.values():
        _warm(e, list(adapters), vocab)
    for rep in range(s.repeats):
        rng = random.Random(100 + rep)  # never seen before, by either engine
        reqs = [
            Req(random_prompt(rng, s.hostile_prompt, vocab), s.hostile_new, adapters[i % len(adapters)])
            for i in range(s.hostile_requests)
        ]
        for caching in (False, True) if rep % 2 == 0 else (True, False):
            t = Timed(engines[caching])
            ids = [t.add(r) for r in reqs]
            wall = t.run()
            best[caching] = max(best.get(caching, 0.0), sum(len(t.tokens[i]) for i in ids) / wall)
            outputs[(caching, rep)] = [t.tokens[i] for i in ids]
    return {
        "tok_s_off": best[False],
        "tok_s_on": best[True],
        "throughput_ratio": best[True] / best[False],
        "hits_on": engines[True].stats()["prefix_cache_hits"],
        "identical": all(outputs[(False, r)] == outputs[(True, r)] for r in range(s.repeats)),
    }


def run(
    model: Path,
    adapter_dirs: list[Path],
    vocab: int,
    s: Sizes,
    done: Callable[[str, dict], None] | None = None,
    only: list[str] | None = None,
) -> dict:
    """The pairs named in `only` (default: all); `done(name, figures)` is called as each
    finishes (the full run is long)."""
    adapters = [parse_peft_adapter(p, key=str(p)) for p in adapter_dirs[: s.adapters]]
    pairs = {
        "shared_prefix": lambda: shared_prefix(model, adapters, vocab, s),
        "multi_turn": lambda: multi_turn(model, adapters, vocab, s),
        "long_prompt_arrival": lambda: long_arrival(model, vocab, s),
        "cache_hostile": lambda: cache_hostile(model, adapters, vocab, s),
    }
    results: dict = {}
    for name, measure in pairs.items():
        if only and name not in only:
            continue
        results[name] = measure()
        if done is not None:
            done(name, results[name])
    return results


def report(results: dict, s: Sizes) -> str:
    sp, mt, la, ch = (
        results[k] for k in ("shared_prefix", "multi_turn", "long_prompt_arrival", "cache_hostile")
    )
    c = f"chunk{s.chunk_tokens}"
    lines = [
        f"shared prefix ({s.adapters} adapters x {s.per_adapter}, {s.system_tokens}+{s.unique_tokens} tokens, "
        f"{s.new_tokens} new): p50 TTFT off {sp['ttft_p50_s_off']:.2f} s / on {sp['ttft_p50_s_on']:.2f} s = "
        f"{sp['ttft_ratio']:.1f}x lower (target >= 5x); throughput off {sp['tok_s_off']:.1f} / on "
        f"{sp['tok_s_on']:.1f} tok/s = {sp['throughput_ratio']:.2f}x (target >= 1.5x); identical: {sp['identical']}",
        f"multi-turn chat ({s.conversations} conversations x {s.turns} turns): total off {mt['total_s_off']:.1f} s / "
        f"on {mt['total_s_on']:.1f} s = {mt['time_ratio']:.2f}x lower (target >= 2x); identical: {mt['identical']}",
        f"long prompt arrival ({s.streams} streams, a {s.long_prompt}-token prompt): chunked ({s.chunk_tokens} "
        f"tokens/step) p99 ITL during its prefill {la[f'prefill_itl_p99_ms_{c}']:.0f} ms vs steady p50 "
        f"{la[f'steady_itl_p50_ms_{c}']:.0f} ms = {la[f'itl_ratio_{c}']:.2f}x (target <= 2x; "
        f"{la[f'itl_ratio_{c}_vs_whole_steady']:.2f}x the unchunked engine's steady p50), its TTFT "
        f"{la[f'long_ttft_s_{c}']:.1f} s; whole prefill: {la['prefill_itl_p99_ms_whole']:.0f} ms vs "
        f"{la['steady_itl_p50_ms_whole']:.0f} ms = {la['itl_ratio_whole']:.1f}x, its TTFT "
        f"{la['long_ttft_s_whole']:.1f} s",
        f"cache-hostile ({s.hostile_requests} unique {s.hostile_prompt}-token prompts, {s.hostile_new} new): "
        f"on {ch['tok_s_on']:.1f} / off {ch['tok_s_off']:.1f} tok/s = {ch['throughput_ratio']:.3f}x "
        f"(target >= 0.97; best of {s.repeats}, alternating); identical: {ch['identical']}",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--chunk-tokens", type=int, help="prompt tokens per step with chunked prefill")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument(
        "--pairs", help="comma-separated subset: shared_prefix,multi_turn,long_prompt_arrival,cache_hostile"
    )
    args = ap.parse_args()
    s = QUICK if args.quick else Sizes()
    if args.chunk_tokens:
        s.chunk_tokens = args.chunk_tokens
    base = build_model("smollm", DEFAULT_CACHE)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    adapter_dirs = build_adapters(base, 16, range(s.adapters), DEFAULT_CACHE)
    model = long_context(base)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix-cache{'-quick' if args.quick else ''}-{time.strftime('%Y-%m-%d-%H%M')}.json"
    partial: dict = {}

    def done(name: str, figures: dict) -> None:  # written as each pair finishes
        partial[name] = figures
        print(f"{name}: {json.dumps(figures)}  (load average {os.getloadavg()})", flush=True)
        path.write_text(json.dumps({"sizes": asdict(s), "results": partial, "started": started}, indent=1))

    only = args.pairs.split(",") if args.pairs else None
    results = run(model, adapter_dirs, vocab, s, done, only)
    print(f"bench.prefix_cache {'--quick ' if args.quick else ''}{started}, load average {os.getloadavg()}")
    if only is None:
        print(report(results, s))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
