"""bench/decode_bursts.py on the real SmolLM2 model: both modes run on one engine, and every
native call its clock subtracts is one the engine makes (so the per-token "outside" figure of
one step at a time leaves out the decode stack, the lm_head and the embedding)."""

from __future__ import annotations

import pytest

from bench import decode_bursts
from tests.fixtures.native import native_kernel_or_skip


def test_bench_alternates_the_modes_and_reports_each(capsys: pytest.CaptureFixture[str]) -> None:
    native_kernel_or_skip()
    assert decode_bursts.main(["--precisions", "int8", "--steps", "1,2", "--reps", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:2] + r[5:] for r in rows] == [
        ["int8", "1", "greedy"],
        ["int8", "2", "greedy"],
        ["int8", "1", "sampled"],
        ["int8", "2", "sampled"],
    ]
    assert float(rows[0][3]) == 1.0 and float(rows[2][3]) == 1.0
    # outside the native calls: the engine's Python alone, well under half of each token's time
    # (the whole of it where the clock missed the stack, the lm_head or the burst's call)
    assert all(0 < float(r[4]) < 0.5 * 1e3 / float(r[2]) for r in rows)
