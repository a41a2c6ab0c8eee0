"""The committed demo model and adapters really do what the README promises.

`transformers` + `peft` greedy decoding is the oracle here, so a failure means
the assets are wrong, not loraserve.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.demo.cases import (
    DEMO_DIR,
    MODEL_DIR,
    TASKS,
    adapter_dir,
    demo_cases,
    demo_inputs,
    exact_match,
    is_held_out,
)

ADAPTER_MIN_ACCURACY = 0.9
BASE_MAX_ACCURACY = 0.2

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    """One base model with all three adapters attached under their task names."""
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    lora = peft.PeftModel.from_pretrained(base, adapter_dir(TASKS[0]), adapter_name=TASKS[0])
    for task in TASKS[1:]:
        lora.load_adapter(adapter_dir(task), adapter_name=task)
    lora.eval()
    return lora


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def _budget(tokenizer, cases: list[tuple[str, str]]) -> int:
    return max(len(tokenizer(want, add_special_tokens=False)["input_ids"]) for _, want in cases) + 2


def test_files_are_small_hf_layout() -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (MODEL_DIR / name).is_file(), name
    for task in TASKS:
        assert (adapter_dir(task) / "adapter_config.json").is_file()
        assert (adapter_dir(task) / "adapter_model.safetensors").is_file()
    tiny = [p for p in DEMO_DIR.rglob("*") if p.is_file() and "smollm2" not in p.parts]
    assert sum(p.stat().st_size for p in tiny) < 10 * 2**20
    # The real model's adapters (rank 8, seven projections, float16): a few MB each.
    for p in (DEMO_DIR / "smollm2" / "adapters").glob("*/adapter_model.safetensors"):
        assert p.stat().st_size < 6 * 2**20, p


def test_chat_template_renders_the_demo_prompt(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>hello<|assistant|>"
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in tokenizer.all_special_ids
    gen = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.parametrize("task", TASKS)
def test_cases_are_held_out(task: str) -> None:
    cases = demo_cases(task)
    assert len(cases) >= 30
    assert all(is_held_out(text) for text in demo_inputs(task))


@pytest.mark.parametrize("task", TASKS)
def test_adapter_does_its_task_and_base_does_not(model, tokenizer, task: str) -> None:
    cases = demo_cases(task)
    prompts = [p for p, _ in cases]
    model.set_adapter(task)
    got = greedy(model, tokenizer, prompts, _budget(tokenizer, cases))
    assert exact_match(got, cases) >= ADAPTER_MIN_ACCURACY, list(zip(got, cases, strict=True))[:5]
    with model.disable_adapter():
        base_got = greedy(model, tokenizer, prompts, _budget(tokenizer, cases))
    assert exact_match(base_got, cases) <= BASE_MAX_ACCURACY
