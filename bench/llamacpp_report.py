"""The text report of bench/llamacpp.py: the machine it ran on, then one table per precision.

The machine line matters as much as the figures: llama.cpp's and our kernels differ between
AVX2 and AVX-512 hosts, and a shared 2-core box moves absolute figures between runs (only the
ratios measured side by side in one run mean anything).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess

from bench.engine_decode import PAIRED_AGREE  # the harness runs bench.engine_decode with it
from bench.llamacpp_setup import MODELS, REPO, LlamaCpp

FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
)


def cpu_description() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "?", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("?", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in FLAGS_OF_INTEREST if f in have]
                    break
    except OSError:
        pass
    return model, flags


def _cmd_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def environment(llama: LlamaCpp, args: argparse.Namespace, loadavg: tuple[float, ...]) -> dict:
    import torch

    model, flags = cpu_description()
    version = [
        ln for ln in _cmd_output([llama.exe("llama-server"), "--version"]).splitlines() if "version" in ln
    ]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "commit": _cmd_output(["git", "rev-parse", "--short", "HEAD"]),
        "llama_cpp": version[0] if version else "?",
        "loadavg_start": loadavg,
        "args": vars(args) | {"out": str(args.out) if args.out else None},
    }


def _f(x: float | None, unit: str = "") -> str:
    return "—" if x is None else f"{x:.1f}{unit}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def _table(block: dict, threads: int) -> list[str]:
    s = block["summary"]
    t = threads
    rows = [
        (
            f"batch-1 decode tok/s, -t {t}, engines: ours in-process vs llama-bench tg64",
            s.get("ours_engine_decode"),
            s["llama_tg64"],
            "≥ 1.0×",
        ),
        (
            f"batch-1 decode tok/s, -t {t}, servers: one streamed request each",
            s["ours_decode"],
            s["llama_server_decode"],
            "≥ 1.0×",
        ),
        (
            f"batch-1 decode tok/s, -t {t}, our server vs llama-bench tg64",
            s["ours_decode"],
            s["llama_tg64"],
            "",
        ),
        (
            f"reference: llama-bench tg64 from an empty context (its usual figure), -t {t}",
            None,
            s.get("llama_tg64_d0"),
            "",
        ),
        (f"prompt 128 tokens tok/s, -t {t} (vs llama-bench pp128)", s["ours_pp"], s["llama_pp128"], "≥ 1.0×"),
        (
            f"prompt 128 tokens tok/s, -t {t} (vs llama-server, time to first token)",
            s["ours_pp"],
            s["llama_server_pp"],
            "≥ 1.0×",
        ),
        (
            f"32 requests, each its own rank-16 adapter, tok/s, -t {t}",
            s["ours_mixed"],
            s["llama_mixed"],
            "≥ 3×",
        ),
        (f"32 requests, base model, tok/s, -t {t}", s["ours_base32"], s["llama_base32"], ""),
        (
            "batch-1 decode tok/s, 1 thread, engines: ours in-process vs llama-bench tg64 -t 1",
            s.get("ours_engine_t1_decode"),
            s["llama_tg64_t1"],
            "≥ 1.0×",
        ),
        (
            "batch-1 decode tok/s, 1 thread, our server vs llama-bench tg64 -t 1",
            s["ours_t1_decode"],
            s["llama_tg64_t1"],
            "",
        ),
        (
            "prompt 128 tokens tok/s, 1 thread (vs llama-bench pp128 -t 1)",
            s["ours_t1_pp"],
            s["llama_pp128_t1"],
            "≥ 1.0×",
        ),
    ]
    out = ["| measure | ours | llama.cpp | ours ÷ llama.cpp | target |", "|---|---|---|---|---|"]
    out += [f"| {name} | {_f(a)} | {_f(b)} | {_ratio(a, b)} | {tgt} |" for name, a, b, tgt in rows]
    pr = s.get("paired")
    # with paired bursts, the target is theirs: a probe seconds away from the tokens it divides
    # misreads a host whose free bandwidth moves within a second (bench/roofline.py PairedProbe)
    target = "reference" if pr else "≥ 70%"
    if s.get("share_ours_engine") is not None:  # bandwidth read beside each measurement
        roof = (
            f"| batch-1 decode, share of the weight-read roofline (bandwidth read beside each "
            f"measurement, median {_f(s.get('bandwidth_engine_gbs'))} / {_f(s.get('bandwidth_llama_gbs'))} GB/s): "
            f"engine (our server) | {_share(s['share_ours_engine'])} ({_share(s.get('share_ours_server'))}) | "
            f"{_share(s.get('share_llama'))} | | {target} |"
        )
    else:  # a JSON from before the per-measurement readings: the start-of-run bandwidth
        roof = (
            f"| batch-1 decode, share of the weight-read roofline ({_f(s['roofline_ours'])} / "
            f"{_f(s['roofline_llama'])} tok/s): engine (our server) | "
            f"{_pct(s.get('ours_engine_decode'), s['roofline_ours'])} ({_pct(s['ours_decode'], s['roofline_ours'])}) | "
            f"{_pct(s['llama_tg64'], s['roofline_llama'])} | | {target} |"
        )
    roofs = [roof]
    if pr:  # each burst against the bandwidth read right before and after it
        roofs.append(
            f"| batch-1 decode, share of the weight-read roofline, each burst against a 64 MiB read right "
            f"before and after it ({pr['slices']} bursts whose two reads agree within {100 * PAIRED_AGREE:.0f} %; median "
            f"{_f(pr['bandwidth_gbs'])} GB/s): engine, all (faster half at {_f(pr['bandwidth_faster_gbs'])} / "
            f"slower half at {_f(pr['bandwidth_slower_gbs'])} GB/s) | {_share(pr['share'])} "
            f"({_share(pr['share_faster'])} / {_share(pr['share_slower'])}) | | | ≥ 70% |"
        )
    rss = block.get("rss", {})
    mem = (
        f"| server RSS MB, now / peak | {_mem(rss.get('ours'))} | {_mem(rss.get('llama'))} | "
        f"{_ratio((rss.get('ours') or {}).get('peak_rss_mb'), (rss.get('llama') or {}).get('peak_rss_mb'))} | |"
    )
    return [*out, *roofs, mem]


def _pct(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{100 * a / b:.0f}%"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _mem(m: dict | None) -> str:
    return "—" if not m else f"{m['rss_mb']:.0f} / {m['peak_rss_mb']:.0f}"


def _by_round(s: dict) -> list[str]:
    """Each round's batch-1 ratios, so a reader sees how far the host moved them."""
    parts = [
        f"{name} {' / '.join(f'{x:.2f}' for x in s[key])} ×"
        for name, key in (("engines", "engines_by_round"), ("servers", "servers_by_round"))
        if s.get(key)
    ]
    return ["", "By round, batch-1 decode, ours ÷ llama.cpp: " + "; ".join(parts) + "."] if parts else []


def _greedy_lines(rows: list[dict], n: int) -> list[str]:
    out = [
        "",
        f"Greedy tokens, ours fp32 vs llama-server F32 (at most {n} new tokens, stopping at EOS):",
    ]
    for r in rows:
        verdict = "EQUAL" if r["equal"] else f"DIFFER from token {r['first_mismatch']}"
        tok = "" if r["prompt_ids_equal"] else " (prompt tokenised differently!)"
        out.append(f"- adapter {r['adapter'] or '(none)'}, prompt {r['prompt']!r}: {verdict}{tok}")
    n_eq = sum(r["equal"] for r in rows)
    out.append(f"greedy check: {n_eq}/{len(rows)} equal")
    return out


def format_report(env: dict, blocks: list[dict], args: argparse.Namespace) -> str:
    model = env.get("model") or MODELS["smollm2"]  # a JSON from before --model: the 135M model
    lines = [
        f"# loraserve vs llama.cpp on {model[0]} — {env['date']} (machine shared)",
        "",
        f"CPU: {env['cpu']}, {env['cores']} cores, flags: {' '.join(env['cpu_flags'])}",
        f"torch {env['torch']}, loraserve {env['commit']}, llama.cpp {env['llama_cpp']}",
        f"load average at start {env['loadavg_start'][0]:.2f}, at end {env['loadavg_end'][0]:.2f}; "
        f"{env['minutes']:.0f} minutes; memory read bandwidth {env['bandwidth_gbs']:.1f} GB/s; "
        f"{env['params'] / 1e6:.1f} M weights read per token",
        f"rounds {args.rounds} (batch-1, prompt), {args.concurrent_rounds} (concurrent), interleaved; medians. "
        "Servers' batch-1 decode and 32 requests on distinct adapters: twice a round in mirrored order "
        "(ours, llama-server, llama-server, ours), the mean of the two; our engine's batch-1 decode before and "
        "after llama-bench, the mean of the two. "
        f"Prompts {args.prompt_tokens} random token ids, {args.new_tokens} new tokens, greedy, EOS ignored.",
        f"llama-bench tg64 runs at depth {args.prompt_tokens} (-d), the context our engine and both servers "
        "decode at after the prompt; its usual empty-context tg64 is the reference row.",
        f"Weights: {model[1]}; both engines load the same GGUF file per precision.",
        "Shared-machine caveat: llama.cpp at -t 2 stalls at every barrier when another process holds a core; "
        "the 1-thread rows are the fair reading on a busy box.",
    ]
    if getattr(args, "paired_slices", 0):
        lines.append(
            f"Our engine's roofline share with the target: {args.paired_slices} of its decode bursts a reading, "
            "each against a 64 MiB read right before and after it (a shared host's free bandwidth can move "
            "between levels within a second; a probe seconds away divides by a level the tokens may not have seen)."
        )
    if getattr(args, "isa", "native") == "avx2":
        from bench.isa_env import AVX2_MARCH, AVX2_TORCH_ENV

        torch_env = ", ".join(f"{k}={v}" for k, v in AVX2_TORCH_ENV.items())
        lines.append(
            f"ISA: AVX2 only on both sides, whatever this host has: ours with the -march={AVX2_MARCH} kernels "
            f"and torch capped at AVX2 ({torch_env}); llama.cpp's AVX2 build (GGML_NATIVE=OFF, "
            "AVX/AVX2/FMA/F16C/BMI2)."
        )
    from bench.llamacpp_setup import REPACK_WORKS

    off = [os.path.basename(m) for (_, m), ok in REPACK_WORKS.items() if not ok]
    if off:
        lines.append(
            f"llama.cpp weight repacking (AMX/interleaved buffers) crashes here on {', '.join(off)}: "
            "run with --repack 0 / --no-repack (its plain CPU kernels) for those."
        )
    if env.get("trained_adapters"):
        lines.append(f"Trained adapters (greedy check): {', '.join(env['trained_adapters'])}")
    for b in blocks:
        flags = " ".join(b["ours_flags"]) or "(default fp32)"
        lines += ["", f"## ours {b['precision']} ({flags}) vs llama.cpp {b['gguf']}", ""]
        if b.get("ours_unavailable"):
            lines.append(f"ours: not available ({b['ours_unavailable']})")
            lines.append("")
        lines += _table(b, args.threads)
        lines += _by_round(b["summary"])
        if b.get("greedy"):
            lines += _greedy_lines(b["greedy"], getattr(args, "greedy_tokens", 32))
    return "\n".join(lines)
