"""`bench/medusa.py`'s inputs and report, without servers (the servers are exercised in tests/server)."""

from __future__ import annotations

from bench.medusa import (
    Measure,
    Request,
    Workload,
    format_table,
    plain_twin,
    prose_prompts,
    summarise,
    workloads,
)


def test_workloads_pair_each_request_with_its_plain_twin() -> None:
    ws = workloads(6, [1, 8])
    assert [(w.name, w.batch) for w in ws] == [(n, b) for b in (1, 8) for n in ("prose", "chat", "chat+lora")]
    assert prose_prompts(6) == [r.inputs for r in ws[0].requests]  # seeded: the same every run
    lora = ws[2].requests
    assert any(r.adapter_id.endswith("upper_medusa") for r in lora)
    twins = [plain_twin(r) for r in lora]
    assert not any(t.adapter_id.endswith("upper_medusa") for t in twins)
    assert [t.inputs for t in twins] == [r.inputs for r in lora]


def test_summary_and_table() -> None:
    w = Workload("prose", 1, [Request("x", None, 4)])
    spec = [Measure(1.0, 100, 25, 90, ["a"]), Measure(2.0, 100, 25, 90, ["a"])]
    plain = [Measure(2.0, 100, texts=["a"]), Measure(3.0, 100, texts=["a"])]
    row = summarise(w, spec, plain)
    assert row["tokens_per_step"] == 3.6 and row["speedup_median"] == 1.75 and row["identical_outputs"]
    assert "1.75x" in format_table([row])
