"""Turn raw run results into the paired ratios the targets are stated in, and print them.

Absolute numbers on a shared 2-core box drift a lot between runs; a ratio of two
figures measured side by side in the same run is what the targets are judged on.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.metrics import RunResult


@dataclass
class Ratio:
    name: str
    value: float | None
    target: str = ""  # e.g. ">= 0.85"; empty = informational
    passed: bool | None = None

    def to_json(self) -> dict:
        return dict(name=self.name, value=self.value, target=self.target, passed=self.passed)


def _check(value: float | None, target: str) -> bool | None:
    if value is None or not target:
        return None
    op, bound = target.split()
    return (
        value >= float(bound) if op == ">=" else value <= float(bound) if op == "<=" else value < float(bound)
    )


class Results:
    """Lookup of results by (system, run name)."""

    def __init__(self, results: list[RunResult]) -> None:
        self.by_key = {(r.system, r.run): r for r in results}

    def get(self, system: str, run: str) -> RunResult | None:
        return self.by_key.get((system, run))

    def field(self, system: str, run: str, name: str) -> float | None:
        r = self.get(system, run)
        if r is None:
            return None
        return getattr(r, name) if hasattr(r, name) else r.extra.get(name)

    def ratio(
        self, name: str, num: tuple[str, str, str], den: tuple[str, str, str] | float | None, target: str = ""
    ) -> Ratio | None:
        a = self.field(*num)
        b = den if isinstance(den, float) else (self.field(*den) if den else None)
        if a is None or b is None or b == 0:
            return None
        value = a / b
        return Ratio(name, value, target, _check(value, target))


def compute_ratios(results: list[RunResult], ns: list[int], roofline_tok_s: float | None) -> list[Ratio]:
    R = Results(results)
    out: list[Ratio | None] = []
    for n in ns:
        d, b, o = f"a/N={n}/distinct", f"a/N={n}/base", f"a/N={n}/one"
        tgt = n == 32
        out += [
            R.ratio(
                f"N={n} ours distinct / ours base",
                ("ours", d, "tok_s"),
                ("ours", b, "tok_s"),
                ">= 0.85" if tgt else "",
            ),
            R.ratio(f"N={n} ours one-adapter / ours base", ("ours", o, "tok_s"), ("ours", b, "tok_s")),
            R.ratio(
                f"N={n} ours distinct / hf+peft distinct",
                ("ours", d, "tok_s"),
                ("hf", d, "tok_s"),
                ">= 3" if tgt else "",
            ),
            R.ratio(
                f"N={n} ours distinct / vllm distinct",
                ("ours", d, "tok_s"),
                ("vllm", d, "tok_s"),
                ">= 3" if tgt else "",
            ),
            R.ratio(
                f"N={n} ours distinct / hf base (stretch)",
                ("ours", d, "tok_s"),
                ("hf", b, "tok_s"),
                ">= 1" if tgt else "",
            ),
            R.ratio(f"N={n} ours base / hf base", ("ours", b, "tok_s"), ("hf", b, "tok_s")),
            R.ratio(f"N={n} ours base / vllm base", ("ours", b, "tok_s"), ("vllm", b, "tok_s")),
            R.ratio(f"N={n} hf+peft distinct / hf base", ("hf", d, "tok_s"), ("hf", b, "tok_s")),
            R.ratio(f"N={n} vllm distinct / vllm base", ("vllm", d, "tok_s"), ("vllm", b, "tok_s")),
        ]
    mixed = [r.run for r in results if r.run.endswith("/mixed-ranks") and r.system == "ours"]
    for run in mixed:
        n = run.split("/")[1]
        out.append(
            R.ratio(
                f"{n} ours mixed ranks 8/16/64 / ours base",
                ("ours", run, "tok_s"),
                ("ours", f"a/{n}/base", "tok_s"),
            )
        )
        out.append(
            R.ratio(
                f"{n} ours mixed ranks / hf+peft mixed ranks", ("ours", run, "tok_s"), ("hf", run, "tok_s")
            )
        )
    out += [
        R.ratio(
            "zipf ours / base ours (tok/s)",
            ("ours", "b/zipf", "tok_s"),
            ("ours", "b/base", "tok_s"),
            ">= 0.7",
        ),
        R.ratio(
            "zipf p99 TTFT / one-adapter p99 TTFT",
            ("ours", "b/zipf", "ttft_p99_ms"),
            ("ours", "b/one", "ttft_p99_ms"),
            "<= 3",
        ),
        R.ratio("cold load p50 (ms) / 50 ms", ("ours", "c/cold", "load_p50_ms"), 50.0, "< 1"),
        R.ratio(
            "ITL p99 during cold loads / during warm control",
            ("ours", "c/cold", "window_itl_p99_ms"),
            ("ours", "c/warm", "window_itl_p99_ms"),
            "< 1.2",
        ),
    ]
    if roofline_tok_s:
        out += [
            R.ratio(
                "batch-1 decode ours / roofline", ("ours", "batch1_decode", "tok_s"), roofline_tok_s, ">= 0.5"
            ),
            R.ratio("batch-1 decode hf / roofline", ("hf", "batch1_decode", "tok_s"), roofline_tok_s),
            R.ratio("batch-1 decode vllm / roofline", ("vllm", "batch1_decode", "tok_s"), roofline_tok_s),
        ]
    out.append(
        R.ratio(
            "batch-1 decode ours / hf", ("ours", "batch1_decode", "tok_s"), ("hf", "batch1_decode", "tok_s")
        )
    )
    return [r for r in out if r is not None]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def results_table(results: list[RunResult]) -> str:
    head = "| system | run | reqs | out tok | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | peak RSS MB |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.system} | {r.run} | {r.requests} | {r.output_tokens} | {_fmt(r.tok_s)} | "
            f"{_fmt(r.ttft_p50_ms, 0)}/{_fmt(r.ttft_p99_ms, 0)} | {_fmt(r.itl_p50_ms)}/{_fmt(r.itl_p99_ms)} | "
            f"{_fmt(r.peak_rss_mb, 0)} |"
        )
    return "\n".join(lines)


def extras_table(results: list[RunResult]) -> str:
    rows = [r for r in results if r.extra]
    if not rows:
        return ""
    lines = ["| system | run | details |", "|---|---|---|"]
    for r in rows:
        detail = ", ".join(f"{k}={_fmt(v, 1) if isinstance(v, float) else v}" for k, v in r.extra.items())
        lines.append(f"| {r.system} | {r.run} | {detail} |")
    return "\n".join(lines)


def ratios_table(ratios: list[Ratio]) -> str:
    lines = ["| ratio | value | target | met |", "|---|---|---|---|"]
    for r in ratios:
        met = "" if r.passed is None else ("yes" if r.passed else "NO")
        lines.append(f"| {r.name} | {_fmt(r.value, 2)} | {r.target} | {met} |")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The tables of a run_all JSON report, as Markdown (what the README quotes)."""
    meta, roof = report["meta"], report["roofline"]
    results = [RunResult(**r) for r in report["results"]]
    load = meta.get("loadavg_start", [0.0])[0]
    parts = [
        f"### {meta['shape']} ({'quick' if meta.get('quick') else 'full'}), {meta.get('started', '')}, "
        f"{meta.get('cpus')} CPUs, load average {load:.1f} at start",
        f"Roofline: {roof['bandwidth_gbs']:.1f} GB/s ÷ {roof['weight_bytes_per_token'] / 1e6:.0f} MB of weights "
        f"per token = {roof['roofline_tok_s']:.1f} tok/s batch-1 decode ceiling",
        results_table(results),
    ]
    extras = extras_table([r for r in results if r.system == "ours"])
    if extras:
        parts.append(extras)
    parts.append(ratios_table([Ratio(**r) for r in report["ratios"]]))
    parts += [f"NOTE: {n}" for n in report.get("notes", [])]
    return "\n\n".join(parts)


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    ap = argparse.ArgumentParser(description="print the tables of a bench/run_all JSON report")
    ap.add_argument("report", type=Path)
    print(format_report(json.loads(ap.parse_args().report.read_text())))


if __name__ == "__main__":
    main()
