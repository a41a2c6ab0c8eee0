"""The demo adapters do their tasks through loraserve's own engine, all in one mixed batch."""

from __future__ import annotations

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from tests.demo.cases import MODEL_DIR, TASKS, adapter_dir, demo_cases, exact_match


def test_each_adapter_does_its_task_and_the_base_does_not() -> None:
    engine = Engine.from_pretrained(
        MODEL_DIR, EngineConfig(max_lora_rank=16, max_active_adapters=4, kv_cache_memory_bytes=64 << 20)
    )
    adapters = {task: parse_peft_adapter(adapter_dir(task)) for task in TASKS}
    prompts, rows, owners = [], [], []
    for task in TASKS:  # every case with its adapter, and again on the base model, in ONE batch
        for prompt, _ in demo_cases(task):
            for adapter in (adapters[task], None):
                prompts.append(prompt)
                rows.append(adapter)
                owners.append((task, adapter is not None))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24), rows)
    for task in TASKS:
        cases = demo_cases(task)
        tuned = [r.generated_text for r, o in zip(results, owners) if o == (task, True)]
        base = [r.generated_text for r, o in zip(results, owners) if o == (task, False)]
        assert exact_match(tuned, cases) >= 0.9, (task, tuned)
        assert exact_match(base, cases) <= 0.2, (task, base)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
