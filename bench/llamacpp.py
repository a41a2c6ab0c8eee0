"""`make bench-real`: loraserve against llama.cpp on a real model (SmolLM2-135M-Instruct).

At the same bits per weight (our fp32 ↔ llama.cpp F32, our `--dtype bfloat16` ↔ BF16, our
`--quantize int8` ↔ Q8_0; ours "not available" where our server refuses the flag), in
interleaved rounds (ours, then llama.cpp, in every round; medians over rounds):

* batch-1 decode: one streamed request (128-token prompt, 64 new tokens) to each server, twice a
  round in mirrored order (ours, llama-server, llama-server, ours; the mean of the two), and
  engine to engine: ours in a fresh process with no server (bench/engine_decode.py), before and
  after llama-bench (the mean of the two), against llama-bench's tg64 at depth 128 (`-d`: the
  same context as ours after its prompt, so both attentions read the same cache; its usual
  empty-context tg64 is reported beside it);
* prompt processing: time to the first token of one 128-token prompt, and llama-bench's pp128;
* 32 concurrent requests (128-token prompts, 64 new tokens, EOS ignored), each with its own
  rank-16 adapter (twice a round in mirrored order, the mean of the two) — llama-server with
  per-request LoRA (`-np 32 -cb`, every adapter loaded at scale 0) — and the same 32 on the
  base model;
* the same batch-1 figures with one thread each (llama.cpp's `-t 2` collapses when another
  process takes one of two cores: the 1-thread reading is the fair one on a shared box);
* % of the memory-bandwidth roofline of the weights read per token, and both servers' RSS.

It also checks that greedy tokens equal llama.cpp's F32 output, with and without an adapter.
Without a built llama.cpp it says so and exits 0. Never part of `make bench` or CI.

    python -m bench.llamacpp [--adapters demo/smollm2/adapters/*] [--precisions fp32,bf16,int8]
        [--rounds 3] [--concurrent-rounds 2] [--threads 2] [--no-t1] [--isa native|avx2]
        [--model smollm2|tinyllama-1b] [--out report.txt]

`--model tinyllama-1b` runs the same comparison on the ~1B shape (bench/llamacpp_setup.py
`random_1b`: TinyLlama-1.1B's layers with SmolLM2's tokenizer, seeded random weights, converted
by llama.cpp's own `convert_hf_to_gguf.py`), where each token reads 8x the 135M model's
weights, so per-call fixed costs weigh less; no trained adapters there (the greedy check runs
without and with a random one).

`--isa avx2` measures both engines as an AVX2-only CPU runs them, on any x86 host: ours with the
`-march=x86-64-v3` kernels and torch capped at AVX2 (bench/isa_env.py), llama.cpp from its AVX2
build (`LLAMACPP_ISA=avx2 scripts/build_llamacpp.sh`: GGML_NATIVE off, AVX2/FMA/F16C on).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.isa_env import avx2_env
from bench.llamacpp_report import environment, format_report
from bench.llamacpp_setup import MODELS, NOT_BUILT, REPO, find_llamacpp

TRAINED_ADAPTERS = REPO / "demo" / "smollm2" / "adapters"
GREEDY_PROMPTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
)


@dataclass(frozen=True)
class Precision:
    name: str  # ours
    flags: tuple[str, ...]  # our server's flags for it
    gguf: str  # llama.cpp's type at the same bits per weight
    bytes_per_weight: float  # ours, for the roofline
    llama_bytes_per_weight: float


PRECISIONS = {
    "fp32": Precision("fp32", (), "F32", 4.0, 4.0),
    "bf16": Precision("bf16", ("--dtype", "bfloat16"), "BF16", 2.0, 2.0),
    "int8": Precision("int8", ("--quantize", "int8"), "Q8_0", 1.0, 34 / 32),  # Q8_0: fp16 scale / 32
    # int8 weights of a bf16 model: many-row GEMMs multiply bf16 activations (layers/precision.py);
    # still finer than Q8_0's own, which llama.cpp quantises to 8 bits per block of 32
    "int8-bf16": Precision("int8-bf16", ("--quantize", "int8", "--dtype", "bfloat16"), "Q8_0", 1.0, 34 / 32),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llamacpp", help="built llama.cpp tree (default ~/.cache/loraserve/peers/llama.cpp)")
    ap.add_argument(
        "--adapters", nargs="*", default=None, help="trained PEFT adapters (default: demo/smollm2/adapters/*)"
    )
    ap.add_argument(
        "--precisions",
        default="fp32,bf16,int8,int8-bf16",
        help="comma-separated subset of " + ",".join(PRECISIONS),
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved batch-1 / prompt rounds")
    ap.add_argument("--concurrent-rounds", type=int, default=2, help="interleaved 32-request rounds")
    ap.add_argument("--concurrent", type=int, default=32, help="concurrent requests (each its own adapter)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--greedy-tokens", type=int, default=32, help="tokens compared in the greedy check")
    ap.add_argument("--no-t1", action="store_true", help="skip the 1-thread batch-1 reading")
    ap.add_argument(
        "--paired-slices",
        type=int,
        default=48,
        help="decode bursts per engine reading read against a probe paired with each (0: none)",
    )
    ap.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="avx2: both engines as on an AVX2-only CPU (our x86-64-v3 kernels and torch capped at "
        "AVX2; llama.cpp's AVX2 build, LLAMACPP_ISA=avx2 scripts/build_llamacpp.sh)",
    )
    ap.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct (real weights); tinyllama-1b: the ~1B shape, random weights",
    )
    ap.add_argument("--out", type=Path, help="also write the report here (and its JSON beside it)")
    args = ap.parse_args(argv)
    unknown = set(args.precisions.split(",")) - set(PRECISIONS)
    if unknown:
        ap.error(f"--precisions: unknown {sorted(unknown)} (choose from {sorted(PRECISIONS)})")
    if args.rounds < 1 or args.concurrent_rounds < 0 or args.concurrent < 1:
        ap.error("--rounds must be >= 1, --concurrent-rounds >= 0, --concurrent >= 1")
    return args


def trained_adapters(given: list[str] | None) -> list[Path]:
    if given is not None:
        return [Path(a).resolve() for a in given]
    return sorted(p.parent.resolve() for p in TRAINED_ADAPTERS.glob("*/adapter_config.json"))


def _max_rank(adapters: list[Path]) -> int:
    ranks = [16]
    for a in adapters:
        cfg = json.loads((a / "adapter_config.json").read_text())
        ranks.append(int(cfg.get("r", 16)))
        ranks.extend(int(r) for r in (cfg.get("rank_pattern") or {}).values())
    return max(ranks)


def _med(xs: list[float | None]) -> float | None:
    """Median of the readings that exist (None: not measured; NaN: failed)."""
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None


def greedy_check(ours, llama, adapters: list[str | None], n: int = 32) -> list[dict]:
    from bench.llamacpp_systems import greedy_ids

    rows = []
    for adapter in adapters:
        for text in GREEDY_PROMPTS:
            p_ours, g_ours = greedy_ids(ours, text, n, adapter)
            p_llama, g_llama = greedy_ids(llama, text, n, adapter)
            if len(g_ours) == len(g_llama) + 1 and g_ours[:-1] == g_llama:
                g_ours = g_ours[:-1]  # ours lists the EOS token it stopped at, llama.cpp does not
            first = next((i for i, (a, b) in enumerate(zip(g_ours, g_llama)) if a != b), None)
            rows.append(
                {
                    "adapter": Path(adapter).name if adapter else None,
                    "prompt": text[:40],
                    "prompt_ids_equal": p_ours == p_llama,
                    "equal": g_ours == g_llama,
                    "first_mismatch": first,
                    "ours": g_ours,
                    "llama": g_llama,
                }
            )
    return rows


def run_block(prec: Precision, ctx: dict, args: argparse.Namespace) -> dict:
    """One precision: our server(s) and llama-server up together, measured in interleaved rounds."""
    from bench import llamacpp_systems as sy

    llama, log_dir = ctx["llama"], ctx["log_dir"]
    model = ctx["models"][prec.gguf]
    adapters: list[Path] = ctx["mixed"] + ctx["trained"]
    rank_flags = ["--max-lora-rank", str(ctx["max_rank"]), "--max-active-adapters", str(len(adapters) + 1)]
    ours = sy.ours_server(
        f"ours-{prec.name}-t{args.threads}",
        model,
        args.threads,
        [*prec.flags, *rank_flags],
        adapters,
        log_dir,
    )
    servers = [ours]
    ours1 = None
    if not args.no_t1 and args.threads != 1:
        small = ["--max-lora-rank", "16", "--max-active-adapters", "1"]
        ours1 = sy.ours_server(f"ours-{prec.name}-t1", model, 1, [*prec.flags, *small], [], log_dir)
        servers.append(ours1)
    lserver = sy.llama_server(
        f"llama-{prec.gguf}-t{args.threads}", llama, model, args.threads, ctx["loras"], log_dir
    )
    servers.append(lserver)
    out: dict = {"precision": prec.name, "gguf": prec.gguf, "ours_flags": list(prec.flags)}
    try:
        for s in servers:
            s.start()
        why = {s.name: s.wait() for s in servers}
        if why[lserver.name]:
            raise RuntimeError(f"llama-server did not start: {why[lserver.name]}")
        if why[ours.name]:
            out["ours_unavailable"] = why[ours.name]
            ours = None
        if ours1 is not None and why[ours1.name]:
            ours1 = None
        sy.set_llama_global_scales_zero(lserver)
        out.update(_measure(prec, ctx, args, ours, ours1, lserver))
        out["rss"] = {"ours": ours.rss_mb() if ours else {}, "llama": lserver.rss_mb()}
    finally:
        for s in servers:
            s.stop()
    return out


def _measure(prec: Precision, ctx: dict, args: argparse.Namespace, ours, ours1, lserver) -> dict:
    from bench import llamacpp_systems as sy
    from bench.roofline import measure_bandwidth_gbs  # torch only once llama.cpp is found

    rng = random.Random(0)
    vocab = ctx["vocab"]

    def prompt() -> list[int]:  # ids above the special tokens
        return [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)]

    p1 = prompt()
    batch = [prompt() for _ in range(args.concurrent)]
    mixed = [str(ctx["mixed"][i % len(ctx["mixed"])]) for i in range(args.concurrent)]
    res: dict = {"rounds": []}
    if prec.name == "fp32" and ours is not None:
        trained = [str(ctx["trained"][0])] if ctx["trained"] else []
        res["greedy"] = greedy_check(ours, lserver, [None, *trained, mixed[0]], n=args.greedy_tokens)
        print(
            "  greedy equal: " + ", ".join(f"{r['adapter']}={r['equal']}" for r in res["greedy"]), flush=True
        )
    # warm-up: every adapter once on both servers, and one batch-1 request
    for s in (ours, lserver):
        if s is not None:
            asyncio.run(sy.concurrent(s, [p1[:16]] * len(mixed), 2, mixed))
            asyncio.run(sy.single(s, p1, 4))
    if ours1 is not None:
        asyncio.run(sy.single(ours1, p1, 4))
    threads = sorted({args.threads, 1} if ours1 is not None else {args.threads})
    for r in range(args.rounds):
        row: dict = {}
        p_decode, p_prompt = prompt(), prompt()  # the same for every system, new every round
        systems = [
            (tag, s)
            for tag, s in (("ours", ours), ("llama_server", lserver), ("ours_t1", ours1))
            if s is not None
        ]
        decodes: dict[str, list[float]] = {tag: [] for tag, _ in systems}
        # batch-1 decode twice, the second pass in the mirrored order (A B C C B A): the host's
        # bandwidth drifts by tens of percent over minutes, and a drift through the round then
        # weighs on every system alike instead of on whichever ran last
        for tag, s in systems:
            st = asyncio.run(sy.single(s, p_decode, args.new_tokens))
            pp = asyncio.run(sy.single(s, p_prompt, 1))
            decodes[tag].append(st.decode_tok_s)
            row[tag] = {"pp_tok_s": len(p_prompt) / pp.ttft, "tokens": st.tokens}
        for tag, s in reversed(systems):
            decodes[tag].append(asyncio.run(sy.single(s, p_decode, args.new_tokens)).decode_tok_s)
        for tag, runs in decodes.items():
            row[tag].update(decode_tok_s=statistics.fmean(runs), decode_runs=runs)
        print(f"  {prec.name} round {r + 1} servers: {json.dumps(_short(row))}", flush=True)
        # the engines the same way: ours before and after llama-bench (its readings at -t N and
        # -t 1 in mirrored order), the mean of the two
        engines = [("ours_engine", args.threads)] + ([("ours_engine_t1", 1)] if ours1 is not None else [])
        engines = engines if ours is not None else []

        def engine(threads: int, seed: int = r) -> dict:
            model = ctx["models"][prec.gguf]
            paired = args.paired_slices if threads == args.threads else 0
            return sy.engine_decode(
                model, threads, prec.flags, args.new_tokens, seed, args.prompt_tokens, paired
            )

        first = {tag: engine(t) for tag, t in engines}
        bw_before = measure_bandwidth_gbs()
        bench_rows = sy.llama_bench(ctx["llama"], ctx["models"][prec.gguf], threads, depth=args.prompt_tokens)
        row["llama_bench"] = {f"{k[0]}_t{k[1]}": v for k, v in bench_rows.items()}
        row["llama_bench_bw"] = max(bw_before, measure_bandwidth_gbs())
        for tag, t in reversed(engines):
            row[tag] = mirrored_engine(first[tag], engine(t))
        res["rounds"].append(row)
        print(f"  {prec.name} round {r + 1}: {json.dumps(_short(row))}", flush=True)
    res["concurrent_rounds"] = []
    for r in range(args.concurrent_rounds):
        row = {}
        pair = [(tag, s) for tag, s in (("ours", ours), ("llama_server", lserver)) if s is not None]
        # mixed adapters (the row with a target) in mirrored order too, the mean of the two
        for tag, s in [*pair, *reversed(pair)]:
            got = asyncio.run(sy.concurrent(s, batch, args.new_tokens, mixed))
            row.setdefault(tag, {}).setdefault("mixed_runs", []).append(got["tok_s"])
            print(f"  {prec.name} {tag} {len(batch)} adapters: {got['tok_s']:.1f} tok/s", flush=True)
        for tag, s in pair:
            row[tag]["mixed"] = {"tok_s": statistics.fmean(row[tag]["mixed_runs"])}
            row[tag]["base"] = asyncio.run(sy.concurrent(s, batch, args.new_tokens, [None] * len(batch)))
            print(f"  {prec.name} {tag} {len(batch)} base: {row[tag]['base']['tok_s']:.1f} tok/s", flush=True)
        res["concurrent_rounds"].append(row)
        print(f"  {prec.name} concurrent round {r + 1}: {json.dumps(_short(row))}", flush=True)
    return res


def mirrored_engine(a: dict, b: dict) -> dict:
    """Our engine's two readings of a round, taken around llama-bench: the mean decode rate, and
    the higher of their bandwidth probes (as llama-bench's share takes the higher of those around
    it)."""
    rates = [a["decode_tok_s"], b["decode_tok_s"]]
    out = {"decode_tok_s": statistics.fmean(rates), "decode_runs": rates}
    out["step_ms"] = statistics.fmean([a["step_ms"], b["step_ms"]])
    out["bandwidth_gbs"] = max(a["bandwidth_gbs"], b["bandwidth_gbs"])
    out["paired"] = a.get("paired", []) + b.get("paired", [])
    return out


def _short(row: dict) -> dict:
    """Round figures to one decimal for the progress line."""
    if isinstance(row, dict):
        return {k: _short(v) for k, v in row.items() if k not in ("tokens", "wall_s")}
    if isinstance(row, list):
        return [_short(v) for v in row]
    return round(row, 1) if isinstance(row, float) else row


def summarise(block: dict, roofline_bw: float, params: int, threads: int) -> dict:
    """Medians over rounds and the ratios ours ÷ llama.cpp."""
    rounds, conc = block.get("rounds", []), block.get("concurrent_rounds", [])

    def med(tag: str, key: str) -> float | None:
        return _med([r[tag][key] for r in rounds if tag in r])

    def bench(key: str) -> float | None:
        return _med([r["llama_bench"][key] for r in rounds if key in r.get("llama_bench", {})])

    def cmed(tag: str, kind: str) -> float | None:
        return _med([r[tag][kind]["tok_s"] for r in conc if tag in r])

    s = {
        "ours_decode": med("ours", "decode_tok_s"),
        "ours_engine_decode": med("ours_engine", "decode_tok_s"),
        "llama_server_decode": med("llama_server", "decode_tok_s"),
        "llama_tg64": bench(f"tg64_t{threads}"),
        "ours_pp": med("ours", "pp_tok_s"),
        "llama_server_pp": med("llama_server", "pp_tok_s"),
        "llama_pp128": bench(f"pp128_t{threads}"),
        "ours_t1_decode": med("ours_t1", "decode_tok_s"),
        "ours_engine_t1_decode": med("ours_engine_t1", "decode_tok_s"),
        "ours_t1_pp": med("ours_t1", "pp_tok_s"),
        "llama_tg64_t1": bench("tg64_t1"),
        "llama_tg64_d0": bench(f"tg64_d0_t{threads}"),
        "llama_pp128_t1": bench("pp128_t1"),
        "ours_mixed": cmed("ours", "mixed"),
        "llama_mixed": cmed("llama_server", "mixed"),
        "ours_base32": cmed("ours", "base"),
        "llama_base32": cmed("llama_server", "base"),
    }
    # each round's own ratio: how far the host's drift moved the medians' ratio
    tg = f"tg64_t{threads}"
    s["servers_by_round"] = [
        r["ours"]["decode_tok_s"] / r["llama_server"]["decode_tok_s"]
        for r in rounds
        if "ours" in r and "llama_server" in r
    ]
    s["engines_by_round"] = [
        r["ours_engine"]["decode_tok_s"] / r["llama_bench"][tg]
        for r in rounds
        if "ours_engine" in r and r.get("llama_bench", {}).get(tg)
    ]
    prec = PRECISIONS[block["precision"]]
    s["roofline_ours"] = roofline_bw * 1e9 / (params * prec.bytes_per_weight)
    s["roofline_llama"] = roofline_bw * 1e9 / (params * prec.llama_bytes_per_weight)
    # Shares against the bandwidth read beside each measurement (in the engine's own process, and
    # around each llama-bench call): the start-of-run reading alone put shares above 100 % once the
    # host's bandwidth rose mid-run. Our server's share uses its round's engine reading.
    ours_b, llama_b = params * prec.bytes_per_weight, params * prec.llama_bytes_per_weight

    def share(tok_s: float | None, bw: float | None, nbytes: float) -> float | None:
        return tok_s * nbytes / (bw * 1e9) if tok_s and bw else None

    s["bandwidth_engine_gbs"] = _med(
        [r["ours_engine"].get("bandwidth_gbs") for r in rounds if "ours_engine" in r]
    )
    s["bandwidth_llama_gbs"] = _med([r["llama_bench_bw"] for r in rounds if "llama_bench_bw" in r])
    s["share_ours_engine"] = _med(
        [
            share(r["ours_engine"]["decode_tok_s"], r["ours_engine"].get("bandwidth_gbs"), ours_b)
            for r in rounds
            if "ours_engine" in r
        ]
    )
    s["share_ours_server"] = _med(
        [
            share(r["ours"]["decode_tok_s"], r.get("ours_engine", {}).get("bandwidth_gbs"), ours_b)
            for r in rounds
            if "ours" in r
        ]
    )
    # the same engine's bursts each read against the bandwidth right beside it (bench/roofline.py
    # PairedProbe): all of them, and the halves where the host's memory read faster and slower
    paired = sorted(
        (p for r in rounds for p in r.get("ours_engine", {}).get("paired", [])), key=lambda p: p[1]
    )
    if paired:
        half = len(paired) // 2

        def shares(ps: list) -> float | None:
            return _med([share(t, bw, ours_b) for t, bw in ps])

        s["paired"] = {
            "slices": len(paired),
            "share": shares(paired),
            "share_faster": shares(paired[half:]),
            "share_slower": shares(paired[:half]),
            "bandwidth_gbs": _med([bw for _, bw in paired]),
            "bandwidth_faster_gbs": _med([bw for _, bw in paired[half:]]),
            "bandwidth_slower_gbs": _med([bw for _, bw in paired[:half]]),
        }
    s["share_llama"] = _med(
        [
            share(r["llama_bench"].get(f"tg64_t{threads}"), r.get("llama_bench_bw"), llama_b)
            for r in rounds
            if "llama_bench" in r
        ]
    )
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    llama = find_llamacpp(args.llamacpp, args.isa)
    if llama is None:
        print(NOT_BUILT + (" (LLAMACPP_ISA=avx2 for --isa avx2)" if args.isa == "avx2" else ""))
        return 0
    if args.isa == "avx2":
        # every engine process of ours (servers, bench/engine_decode.py) inherits it
        os.environ.update(avx2_env())
    # SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop the servers this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    from bench import llamacpp_setup as su
    from bench.roofline import measure_bandwidth_gbs, weight_bytes_per_token

    started = datetime.datetime.now(datetime.timezone.utc)
    print("preparing GGUFs and adapters (once, into bench/.cache/llamacpp) ...", flush=True)
    q41 = su.smollm2_q4_1()
    models = su.quantized_models(llama, q41)
    hf_dir = su.hf_base_dir(models["F32"])
    trained = trained_adapters(args.adapters)
    if args.model == "tinyllama-1b":
        models, hf_dir = su.random_1b(llama, hf_dir)
        trained = [Path(a).resolve() for a in args.adapters or []]  # SmolLM2's do not fit this shape
    mixed = su.random_adapters(hf_dir, min(args.concurrent, 32))
    loras = su.lora_ggufs(llama, [*mixed, *trained], hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    params = weight_bytes_per_token(hf_dir, "float32") // 4
    env = environment(llama, args, loadavg=os.getloadavg())
    torch.set_num_threads(args.threads)  # bandwidth is read with the engines' thread count
    bw = measure_bandwidth_gbs()
    ctx = {
        "llama": llama,
        "models": models,
        "mixed": mixed,
        "trained": trained,
        "loras": loras,
        "vocab": int(config["vocab_size"]),
        "max_rank": _max_rank([*mixed, *trained]),
    }
    blocks = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmp:
        ctx["log_dir"] = Path(tmp)
        for name in args.precisions.split(","):
            print(f"{name}: ours vs llama.cpp {PRECISIONS[name].gguf} ...", flush=True)
            block = run_block(PRECISIONS[name], ctx, args)
            block["summary"] = summarise(block, bw, params, args.threads)
            blocks.append(block)
    env.update(
        model=MODELS[args.model],
        bandwidth_gbs=bw,
        params=params,
        trained_adapters=[str(a.relative_to(REPO)) if a.is_relative_to(REPO) else str(a) for a in trained],
        loadavg_end=os.getloadavg(),
        minutes=(datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60,
        python=platform.python_version(),
    )
    report = format_report(env, blocks, args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
        args.out.with_suffix(".json").write_text(
            json.dumps({"env": env, "blocks": blocks}, indent=1, default=str)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
