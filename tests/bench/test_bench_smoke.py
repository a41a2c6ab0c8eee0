"""The benchmark harness on a tiny model, so it cannot rot between benchmark runs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from bench.baseline_hf import run_hf
from bench.engine_runs import make_engine, run_ours
from bench.kernel_builds import table
from bench.metrics import RunResult, percentile
from bench.report import compute_ratios, ratios_table, results_table
from bench.roofline import measure_bandwidth_gbs, weight_bytes_per_token
from bench.shapes import build_adapters, make_padded_tokenizer, random_prompt
from bench.spec import BenchSpec, repetition
from bench.workloads import Model, cold_load_runs, concurrency_runs, zipf_indices, zipf_runs
from tests.fixtures.tiny_models import load_hf_model, make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    root = tmp_path_factory.mktemp("bench")
    path = make_tiny_model(root / "model", "llama")
    make_padded_tokenizer(path, 384, trained_vocab=300)  # every id decodes
    return Model(path, 384, root / "cache")


def test_padded_tokenizer_covers_vocab(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    make_padded_tokenizer(tmp_path, 1000, trained_vocab=300)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 1000
    assert tok.decode([999]) == "<extra_999>"


def test_adapters_are_cached_and_distinct(tiny: Model) -> None:
    from safetensors.torch import load_file

    a, b = build_adapters(tiny.path, 4, [0, 1], tiny.cache)
    again = build_adapters(tiny.path, 4, [0], tiny.cache)
    assert again == [a]
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert len(wa) == 2 * 7 * 3  # A and B on all seven projections of three layers
    key = next(iter(wa))
    assert not (wa[key] == wb[key]).all()


def test_workloads_are_deterministic(tiny: Model) -> None:
    r1 = zipf_runs(tiny, 6, 10.0, (8, 12), (2, 4), num_adapters=50)
    r2 = zipf_runs(tiny, 6, 10.0, (8, 12), (2, 4), num_adapters=50)
    assert [q.prompt_ids for q in r1[2].requests] == [q.prompt_ids for q in r2[2].requests]
    assert [q.adapter for q in r1[0].requests] == [None] * 6
    assert len({q.adapter for q in r1[1].requests}) == 1
    counts = zipf_indices(random.Random(0), 2000, 1000, 1.0)
    assert counts.count(0) > counts.count(999)
    assert all(3 <= t < 384 for t in random_prompt(random.Random(0), 50, 384))


def test_metrics_and_roofline(tiny: Model) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 99) is None
    # untied embeddings: the LM head is read in full, the embedding lookup (one row) is not counted
    model = load_hf_model(tiny.path)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert weight_bytes_per_token(tiny.path) == 4 * params
    assert measure_bandwidth_gbs(mib=8, repeats=2) > 0


def test_the_bandwidth_probe_reads_pages_like_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The roofline's probe asks for 2 MiB pages as the served weights do (host_allocator): on a
    host whose transparent huge pages are `madvise`, a plain tensor's 4 KiB pages read ~12 % less
    and the shares of the roofline read high."""
    import bench.roofline as roofline

    asked: list[tuple[int, ...]] = []
    real = roofline.zeros_on_huge_pages

    def recording(shape: tuple[int, ...], *args: object, **kw: object) -> torch.Tensor:
        asked.append(shape)
        return real(shape, *args, **kw)

    monkeypatch.setattr(roofline, "zeros_on_huge_pages", recording)
    assert roofline.measure_bandwidth_gbs(mib=16, repeats=1) > 0
    assert asked == [(16 * 2**20 // 4,)]


def test_harness_end_to_end_on_tiny_model(tiny: Model) -> None:
    runs = concurrency_runs(tiny, [1, 2], prompt_len=8, new_tokens=3, rank=4)
    spec = BenchSpec(
        str(tiny.path),
        runs,
        max_lora_rank=8,
        vocab_size=384,
        batch1_decode={"prompt_len": 8, "new_tokens": 4},
    )
    hf = run_hf(spec)
    ours = run_ours(spec)
    assert {r.run for r in hf} == {r.run for r in ours} == {"batch1_decode", *(r.name for r in runs)}
    for r in hf + ours:
        assert r.output_tokens == r.requests * (4 if r.run == "batch1_decode" else 3)
        assert r.tok_s > 0
    assert all(r.ttft_p50_ms is not None and r.itl_p99_ms is not None for r in hf + ours)

    more = zipf_runs(tiny, 3, 50.0, (8, 10), (2, 3), num_adapters=20, rank=4)
    more += cold_load_runs(
        tiny,
        background=2,
        late=2,
        interval_s=0.05,
        prompt_len=8,
        background_tokens=12,
        late_tokens=2,
        start_s=0.05,
        rank=4,
    )
    ours2 = run_ours(BenchSpec(str(tiny.path), more, max_lora_rank=8, vocab_size=384))
    by = {r.run: r for r in ours2}
    assert by["c/cold"].extra["cold_loads"] == 2 and by["c/warm"].extra["cold_loads"] == 0
    assert by["b/zipf"].output_tokens == sum(q.max_new_tokens for q in more[2].requests)

    ratios = compute_ratios(hf + ours + ours2, [1, 2], roofline_tok_s=100.0)
    names = {r.name for r in ratios}
    assert "N=2 ours distinct / hf+peft distinct" in names and "zipf ours / base ours (tok/s)" in names
    assert "| ours |" in results_table(ours) and "| ratio |" in ratios_table(ratios)


def test_interleaved_runs_take_turns_and_keep_every_round(tiny: Model) -> None:
    """kernel_builds' ratios come from rounds in which base and distinct ran one after the other."""
    runs = concurrency_runs(tiny, [2], prompt_len=8, new_tokens=3, rank=4)
    spec = BenchSpec(str(tiny.path), runs, max_lora_rank=8, vocab_size=384, repeats=3, interleave=True)
    by = {r.run: r for r in run_ours(spec)}
    assert set(by) == {r.name for r in runs}
    for r in by.values():
        rounds = r.extra["rounds_tok_s"]
        assert len(rounds) == 3 and r.tok_s == max(rounds) and r.output_tokens == 2 * 3


def test_repetitions_never_read_an_earlier_ones_prefix_cache(tiny: Model) -> None:
    """Best-of-k must time every prefill: a repeated prompt would come out of the prefix cache."""
    runs = concurrency_runs(tiny, [2], prompt_len=40, new_tokens=2, rank=4)
    first = runs[0].requests
    again = repetition(first, 1)
    assert [sorted(r.prompt_ids) for r in again] == [sorted(r.prompt_ids) for r in first]
    assert all(a.prompt_ids[:16] != r.prompt_ids[:16] for a, r in zip(again, first, strict=True))
    for interleave in (False, True):
        spec = BenchSpec(
            str(tiny.path), runs, max_lora_rank=8, vocab_size=384, repeats=3, interleave=interleave
        )
        engine = make_engine(spec)
        run_ours(spec, engine)
        assert engine.stats()["prefix_cache_hits"] == 0
    once = BenchSpec(str(tiny.path), runs[:1], max_lora_rank=8, vocab_size=384)
    engine = make_engine(once)
    run_ours(once, engine)
    run_ours(once, engine)  # the check can fail: the same prompts again do come out of the cache
    assert engine.stats()["prefix_cache_hits"] > 0


def test_a_bench_spec_sets_our_lora_table_dtype_over_the_same_model(tiny: Model) -> None:
    """kernel_builds' `-bf16lora` rows must run bf16 adapter tables on the unchanged fp32 model."""
    for lora_dtype, want in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        engine = make_engine(BenchSpec(str(tiny.path), [], vocab_size=384, adapter_dtype=lora_dtype))
        assert engine.runner.precision.adapter == want and engine.runner.dtype == torch.float32


def test_kernel_builds_table_has_a_row_per_variant_of_ours() -> None:
    def res(system: str, run: str, tok_s: float) -> RunResult:
        return RunResult(system, run, 32, 2048, 2048 / tok_s, tok_s)

    base, dist = "a/N=32/base", "a/N=32/distinct"
    results = [
        res("ours-avx2", base, 200.0),
        res("ours-avx2", dist, 150.0),
        res("ours-avx2-bf16lora", base, 200.0),
        res("ours-avx2-bf16lora", dist, 180.0),
        res("hf-avx2", dist, 50.0),
    ]
    rows = {
        line.split()[0]: line.split()[1:] for line in table(results, ["avx2"], [32], 40.0).splitlines()[2:]
    }
    assert list(rows) == ["ours-avx2", "ours-avx2-bf16lora", "hf-avx2"]
    assert rows["ours-avx2"][2:4] == ["0.75", "3.00"] and rows["ours-avx2-bf16lora"][2:4] == ["0.90", "3.60"]
    # in turns: the median of the rounds' ratios (0.75, 0.95, 0.70 -> 0.75), not best / best (0.86)
    results[0].extra["rounds_tok_s"] = [200.0, 180.0, 160.0]
    results[1].extra["rounds_tok_s"] = [150.0, 171.0, 112.0]
    results[0].tok_s, results[1].tok_s = 200.0, 171.0
    text = table(results, ["avx2"], [32], 40.0)
    assert text.splitlines()[2].split()[3] == "0.75"
    assert "ours-avx2 N=32 distinct/base by round: 0.75 0.95 0.70" in text


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BENCH_VLLM") != "1", reason="opt-in: BENCH_VLLM=1 with .venv-vllm built")
def test_vllm_runner_on_smollm_shape() -> None:
    """vLLM's engine core dies on the 64-wide tiny model, so this uses the (cached) SmolLM shape."""
    from bench.baseline_vllm import run_vllm
    from bench.shapes import build_model

    model = Model(build_model("smollm"), 49152)
    runs = concurrency_runs(model, [2], prompt_len=8, new_tokens=3, rank=16)
    res = run_vllm(BenchSpec(str(model.path), runs, max_lora_rank=16, vocab_size=49152, kv_cache_gib=1))
    assert [r.run for r in res] == [r.name for r in runs]
    assert all(r.output_tokens == 6 and r.tok_s > 0 for r in res)


def test_structured_output_bench_runs_and_reports_its_three_figures(tmp_path) -> None:
    """`make bench`'s structured-output part on the demo model at toy sizes: it runs and writes
    the ratio, the new-schema first-token cost and the mask cost per step."""
    from bench.structured import main as structured

    out = tmp_path / "structured.json"
    report = structured(
        [
            "--shape",
            "demo",
            "--n",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--schemas",
            "1",
            "--out",
            str(out),
        ]
    )
    assert report["throughput_ratio"] > 0 and report["new_schema_added_ttft_ms_median"] is not None
    assert "mask_cost_per_step_ms" in json.loads(out.read_text())


def test_engine_decode_pairs_each_burst_with_the_bandwidth_beside_it(
    tiny: Model, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--paired-slices: each kept slice is one decode call's rate and the mean of the two probe
    reads around it; a pair whose reads disagree (the host changed level mid-burst) is dropped."""
    import bench.engine_decode as engine_decode
    import bench.roofline as roofline

    reads = iter([10.0, 10.0, 10.0, 30.0] * 100)  # every other pair disagrees
    monkeypatch.setattr(roofline.PairedProbe, "__init__", lambda self, mib=64, device="cpu": None)
    monkeypatch.setattr(roofline.PairedProbe, "read_gbs", lambda self: next(reads))
    monkeypatch.setattr(roofline, "measure_bandwidth_gbs", lambda **kw: 1.0)
    args = ["--model", str(tiny.path), "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "12"]
    assert engine_decode.main([*args, "--reps", "1", "--paired-slices", "3", "--decode-steps", "1"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(got["paired"]) == 3
    assert all(bw == 10.0 and tok_s > 0 for tok_s, bw in got["paired"])
