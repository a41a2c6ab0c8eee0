"""`bench/prefix_cache.py` end to end on a tiny model and tiny sizes, so it cannot rot between
benchmark runs (the figures themselves are not checked: timings are not tests)."""

from __future__ import annotations

from pathlib import Path

from bench.prefix_cache import Sizes, long_context, report, run

TINY = Sizes(
    adapters=2,
    per_adapter=2,
    system_tokens=48,
    unique_tokens=5,
    new_tokens=4,
    conversations=3,
    turns=2,
    chat_system=20,
    chat_user=6,
    chat_answer=3,
    streams=3,
    stream_prompt=10,
    long_prompt=200,
    chunk_tokens=16,
    hostile_requests=3,
    hostile_prompt=20,
    hostile_new=3,
    repeats=1,
    kv_gib=0.02,
)


def test_every_pair_runs_and_agrees(llama_dir: Path, llama_adapters: list[Path], tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.symlink_to(llama_dir)
    results = run(long_context(model), llama_adapters[:2], 384, TINY)
    assert all(results[k]["identical"] for k in ("shared_prefix", "multi_turn", "cache_hostile"))
    assert results["shared_prefix"]["hits_on"] > 0 and results["shared_prefix"]["hits_off"] == 0
    assert results["multi_turn"]["hits_on"] > 0
    assert "itl_ratio_chunk16" in results["long_prompt_arrival"]
    text = report(results, TINY)
    assert "shared prefix" in text and "cache-hostile" in text
