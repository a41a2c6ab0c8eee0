"""Decode bursts (engine/decode_bursts.py): several steps in one native call, greedy or sampled at a
temperature, give the one-step path's tokens and logprobs bit for bit, on every weight precision,
tied and untied embeddings, with adapter rows; they run only where nothing needs Python between
two steps, end each request exactly where single steps end it (EOS, stop sequences,
max_new_tokens), and leave no block behind."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine import decode_bursts
from loraserve.engine.decode_bursts import DecodeBursts, burst_length
from loraserve.engine.engine import Engine
from loraserve.engine.logits_pipeline import plain_rows
from loraserve.engine.model_runner import ModelRunner
from loraserve.engine.params import RequestOutput, SamplingParams
from tests.fixtures.call_counter import count_taken
from tests.fixtures.engines import cpu_engine
from tests.fixtures.native import BUILDS, use_build

PROMPTS = [
    [1, 17, 33, 90, 5, 61, 7],
    [1, 200, 3, 44],
    [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6],
    [1, 64, 128, 12, 99, 100, 101, 102, 103, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 40],
]
GREEDY = SamplingParams(max_new_tokens=14, ignore_eos_token=True)
PRECISIONS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


@pytest.fixture(autouse=True)
def _no_time_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bursts as long as --decode-steps allows, however slow a loaded machine's steps: how many
    bursts a test sees must not depend on the pace of its steps."""
    monkeypatch.setattr(decode_bursts, "BURST_SECONDS", 1e9)


def outcome(results: list[RequestOutput]) -> list[tuple]:
    """Everything a client sees of each request, logprobs as exact floats."""
    return [
        ([t.id for t in r.tokens], [t.logprob for t in r.tokens], r.generated_text, r.finish_reason)
        for r in results
    ]


def all_blocks_free(engine: Engine) -> bool:
    stats = engine.stats()
    return stats["free_blocks"] == stats["total_blocks"]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied, and tied (the embedding read from the lm_head)
def test_bursts_equal_single_steps_bit_for_bit(
    tiny_model_dirs: dict[str, Path],
    arch: str,
    precision: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    use_build(build, monkeypatch)
    taken = count_taken(monkeypatch, ModelRunner, "run_burst")
    one = cpu_engine(tiny_model_dirs[arch], "native", decode_steps=1, **PRECISIONS[precision])
    expected = outcome(one.generate(PROMPTS, GREEDY))
    assert taken == []
    engine = cpu_engine(tiny_model_dirs[arch], "native", **PRECISIONS[precision])
    assert outcome(engine.generate(PROMPTS, GREEDY)) == expected
    # 13 tokens after the prefill's: a first step alone (to time it), then bursts of 4, 4, 4,
    # whose steps ran the stack's one parallel region
    assert taken == [True] * 3 and all_blocks_free(engine)
    assert engine.runner.model.decode_stack.native.region_runs() >= 3 * 4


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bursts_with_adapter_rows_equal_single_steps(
    llama_dir: Path,
    llama_adapters: list[Path],
    precision: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    taken = count_taken(monkeypatch, ModelRunner, "run_burst")
    adapters = [parse_peft_adapter(p) for p in llama_adapters[:2]]
    chosen = [adapters[0], adapters[1], None, adapters[0]]
    one = cpu_engine(llama_dir, "native", decode_steps=1, **PRECISIONS[precision])
    expected = outcome(one.generate(PROMPTS, GREEDY, chosen))
    engine = cpu_engine(llama_dir, "native", decode_steps=5, **PRECISIONS[precision])
    assert outcome(engine.generate(PROMPTS, GREEDY, chosen)) == expected
    assert taken and all(taken) and all_blocks_free(engine)
    assert engine.runner.slots.in_use() == 0


def test_requests_end_inside_a_burst_where_single_steps_end_them(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EOS and a stop sequence in the middle of a burst, and a max_new_tokens that is no multiple
    of the burst: the same tokens, text and finish reason as one step at a time."""
    taken = count_taken(monkeypatch, ModelRunner, "run_burst")
    one = cpu_engine(llama_dir, "native", decode_steps=1)
    free_run = one.generate(PROMPTS, GREEDY)
    eos = free_run[0].tokens[6].id  # the 7th token of the first prompt: inside the second burst
    stop = free_run[1].generated_text[5:8]
    assert stop
    params = [
        SamplingParams(max_new_tokens=14),
        SamplingParams(max_new_tokens=14, stop=[stop], ignore_eos_token=True),
        SamplingParams(max_new_tokens=7, ignore_eos_token=True),
        SamplingParams(max_new_tokens=14, ignore_eos_token=True),
    ]
    results = {}
    for steps in (1, 4):
        engine = cpu_engine(llama_dir, "native", decode_steps=steps)
        engine.outputs.eos_ids = {eos}
        results[steps] = outcome(engine.generate(PROMPTS, params))
        assert all_blocks_free(engine)
    assert results[4] == results[1] and taken and all(taken)
    assert (
        results[4][0][3] == "eos_token" and results[4][1][3] == "stop_sequence" and len(results[4][2][0]) == 7
    )


@pytest.mark.parametrize(
    "other",
    [
        SamplingParams(max_new_tokens=10, do_sample=True, seed=7, top_k=5),
        SamplingParams(max_new_tokens=10, do_sample=True, seed=7, top_p=0.9),
        SamplingParams(max_new_tokens=10, do_sample=True, seed=7, typical_p=0.9),
        SamplingParams(max_new_tokens=10, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=10, frequency_penalty=0.5),
        SamplingParams(max_new_tokens=10, watermark=True),
        SamplingParams(max_new_tokens=10, top_n_alternatives=2),
    ],
    ids=["top-k", "top-p", "typical-p", "repetition", "frequency", "watermark", "alternatives"],
)
def test_no_burst_while_a_row_needs_python_between_steps(
    llama_dir: Path, other: SamplingParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = count_taken(monkeypatch, ModelRunner, "run_burst")
    engine = cpu_engine(llama_dir, "native")
    engine.generate(PROMPTS[:2], [SamplingParams(max_new_tokens=10, ignore_eos_token=True), other])
    assert taken == []
    assert not plain_rows(other)
    assert plain_rows(GREEDY) and not plain_rows(GREEDY, grammar=object())
    hot = SamplingParams(do_sample=True, temperature=0.7)
    assert plain_rows(hot)
    assert not plain_rows(hot, grammar=object())
    assert not plain_rows(SamplingParams(do_sample=True, temperature=0.7, repetition_penalty=1.2))


SAMPLED = [
    SamplingParams(max_new_tokens=14, ignore_eos_token=True, do_sample=True, seed=11),  # temperature 1
    SamplingParams(max_new_tokens=14, ignore_eos_token=True, do_sample=True, temperature=0.6, seed=12),
    GREEDY,  # a greedy row beside them
    SamplingParams(max_new_tokens=14, ignore_eos_token=True, do_sample=True, temperature=1.7, seed=13),
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_sampled_rows_burst_as_single_steps_draw_them(
    tiny_model_dirs: dict[str, Path],
    precision: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    """Seeded rows at temperatures 1, 0.6 and 1.7 beside a greedy one: each burst divides by the
    temperature and draws at the uniforms the row's generator gave for its steps, as the steps one
    at a time do, so the text of a seeded request does not depend on bursts; a different seed
    gives different text (the draws are live)."""
    use_build(build, monkeypatch)
    taken = count_taken(monkeypatch, ModelRunner, "run_burst")
    one = cpu_engine(tiny_model_dirs["llama"], "native", decode_steps=1, **PRECISIONS[precision])
    expected = outcome(one.generate(PROMPTS, SAMPLED))
    engine = cpu_engine(tiny_model_dirs["llama"], "native", **PRECISIONS[precision])
    assert outcome(engine.generate(PROMPTS, SAMPLED)) == expected
    assert taken == [True] * 3 and all_blocks_free(engine)
    reseeded = [replace(p, seed=p.seed + 100) if p.seed else p for p in SAMPLED]
    other = outcome(engine.generate(PROMPTS, reseeded))
    assert [o[0] for o in other] != [e[0] for e in expected] and other[2] == expected[2]


def test_a_sampled_row_ending_inside_a_burst_leaves_the_others_draws_alone(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampled row that stops inside a burst (a stop sequence) drew uniforms it never used; the
    other rows' own generators are untouched by that, so their tokens are the single steps'.
    (Three rows: the burst computes the stopped row to its end, and a batch that one step at a
    time has left a single row runs the one-row kernel, whose sums round differently from a
    block's in the last bit.)"""
    one = cpu_engine(llama_dir, "native", decode_steps=1)
    free_run = one.generate(PROMPTS[:3], SAMPLED[:3])
    stop = free_run[0].generated_text[5:8]
    assert stop
    params = [replace(SAMPLED[0], stop=[stop]), *SAMPLED[1:3]]
    results = {}
    for steps in (1, 4):
        engine = cpu_engine(llama_dir, "native", decode_steps=steps)
        results[steps] = outcome(engine.generate(PROMPTS[:3], params))
        assert all_blocks_free(engine)
    assert results[4] == results[1] and results[4][0][3] == "stop_sequence"


def test_burst_length_waits_for_nobody_and_grows_every_table_or_none(llama_dir: Path) -> None:
    engine = cpu_engine(llama_dir, "native")
    for ids in (PROMPTS[0], PROMPTS[2]):
        engine.add_request(ids, SamplingParams(max_new_tokens=40, ignore_eos_token=True))
    engine.step()  # both prompts, one token each
    seqs, blocks = list(engine.scheduler.running), engine.runner.blocks
    lim = engine.limits.max_total_tokens
    tables = [list(seq.block_table) for seq in seqs]
    assert burst_length(seqs, 30, True, lim, blocks) == 1  # a request waits for its first token
    assert burst_length(seqs, 1, False, lim, blocks) == 1
    hog: list[int] = []  # every free block elsewhere: the bursts' tables cannot grow
    blocks.grow(hog, blocks.num_free * blocks.block_size)
    assert burst_length(seqs, 30, False, lim, blocks) == 1
    assert [seq.block_table for seq in seqs] == tables
    blocks.free(hog)
    assert (
        burst_length(seqs, 30, False, max(seq.num_tokens for seq in seqs) + 3, blocks) == 3
    )  # context limit
    assert burst_length(seqs, 30, False, lim, blocks) == 30
    for seq in seqs:  # the burst writes positions up to num_tokens + 28
        assert (
            len(seq.block_table) * blocks.block_size
            >= seq.num_tokens + 29
            > len(tables[0]) * blocks.block_size
        )


def test_a_burst_row_with_non_finite_logits_fails_alone(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = cpu_engine(llama_dir, "native", decode_steps=1)
    expected = outcome(one.generate(PROMPTS, GREEDY))
    real = ModelRunner.run_burst

    def poisoned(self: ModelRunner, seqs: list, steps: int) -> list | None:
        rows = real(self, seqs, steps)
        if (
            rows is not None and not calls
        ):  # the second row's logits go non-finite at the first burst's second step
            rows[1][1] = (rows[1][1][0], rows[1][1][1], False)
        calls.append(steps)
        return rows

    calls: list[int] = []

    monkeypatch.setattr(ModelRunner, "run_burst", poisoned)
    engine = cpu_engine(llama_dir, "native")
    results = engine.generate(PROMPTS, GREEDY)
    assert results[1].finish_reason == "error" and "non-finite" in (results[1].error or "")
    got = outcome(results)
    assert got[0] == expected[0] and got[2:] == expected[2:] and len(calls) > 1
    assert all_blocks_free(engine)


def test_bursts_stay_within_their_time_budget(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst's tokens stream out together: no burst before a decode step was timed, none where
    two steps would pass BURST_SECONDS, and as many steps as fit otherwise."""
    monkeypatch.setattr(decode_bursts, "BURST_SECONDS", 0.05)
    budget = decode_bursts.BURST_SECONDS
    engine = cpu_engine(llama_dir, "native")
    engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos_token=True))
    engine.step()
    seqs, blocks, lim = list(engine.scheduler.running), engine.runner.blocks, engine.limits.max_total_tokens
    policy = DecodeBursts(8)
    assert policy.length(seqs, False, lim, blocks) == 1  # no step timed yet
    policy.took(budget * 3 / 5.5, 3)  # five steps fit, not six
    assert policy.length(seqs, False, lim, blocks) == 5
    policy.took(budget / 100, 1)
    assert policy.length(seqs, False, lim, blocks) == 8  # --decode-steps caps it
    policy.took(budget * 0.6, 1)
    assert policy.length(seqs, False, lim, blocks) == 1
    assert DecodeBursts(1).length(seqs, False, lim, blocks) == 1
