"""The shipped Medusa heads load through loraserve and draft well for the demo model.

Drafts come from loraserve's own `medusa_logits` on hidden states computed by
`transformers` (the oracle for the model); what counts is what a greedy
linear-chain speculator would accept on held-out prompts the heads never saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.medusa_format import parse_adapter_dir
from loraserve.adapters.validation import validate_medusa
from loraserve.layers.medusa import medusa_logits
from loraserve.models.config import ModelConfig
from tests.demo.cases import DEMO_DIR, MODEL_DIR, TASKS, adapter_dir, demo_cases

MEDUSA_DIR = DEMO_DIR / "medusa"
UPPER_MEDUSA_DIR = DEMO_DIR / "adapters" / "upper_medusa"
MIN_TOKENS_PER_STEP = 2.0  # the target for the demo speculator

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not (MEDUSA_DIR / "config.json").is_file(), reason="demo/medusa not built")

TEXT_PROMPTS = ["The big", "Anna saw", "There are", "A quick", "The cat runs", "Ben and Mia", "THE RED"]


def _model(adapter: Path | None = None):
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    if adapter is not None:
        peft = pytest.importorskip("peft")
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


@torch.no_grad()
def tokens_per_step(model, heads, prompts: list[str], max_new_tokens: int = 64) -> float:
    """Greedy-generate each prompt, then replay it as a Medusa linear chain: drafts are accepted
    up to the first one that differs from the model's own next token."""
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    lm_head = model.get_output_embeddings().weight
    steps = tokens = 0
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        seq = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0]
        hidden = model.model(input_ids=seq[None]).last_hidden_state[0]
        drafts = medusa_logits(hidden, heads, lm_head).argmax(-1).T.tolist()  # [T, K]
        seq, k, t = seq.tolist(), heads.num_heads, ids.shape[1] - 1
        while t < len(seq) - 1:
            acc = 0
            while acc < k and t + acc + 2 < len(seq) and drafts[t][acc] == seq[t + acc + 2]:
                acc += 1
            steps, tokens, t = steps + 1, tokens + 1 + acc, t + 1 + acc
    return tokens / steps


def test_demo_heads_load_and_fit_the_demo_model() -> None:
    adapter = parse_adapter_dir(MEDUSA_DIR)
    heads = adapter.medusa
    assert adapter.modules == {} and heads is not None
    assert heads.version == 2 and heads.num_layers == 1 and heads.uses_base_lm_head
    validate_medusa(heads, ModelConfig.from_dir(MODEL_DIR))
    assert sum(p.stat().st_size for p in MEDUSA_DIR.iterdir()) < 2 << 20  # small enough to ship


def test_demo_heads_accept_at_least_two_tokens_per_step() -> None:
    heads = parse_adapter_dir(MEDUSA_DIR).medusa
    prompts = [p for task in TASKS for p, _ in demo_cases(task)[:8]] + TEXT_PROMPTS
    assert tokens_per_step(_model(), heads, prompts) >= MIN_TOKENS_PER_STEP


@pytest.mark.skipif(not (UPPER_MEDUSA_DIR / "config.json").is_file(), reason="upper_medusa not built")
def test_lora_plus_medusa_demo_adapter() -> None:
    adapter = parse_adapter_dir(UPPER_MEDUSA_DIR)
    assert adapter.modules and adapter.medusa is not None
    plain = parse_adapter_dir(adapter_dir("upper"))
    assert set(adapter.modules) == set(plain.modules)
    prompts = [p for p, _ in demo_cases("upper")[:16]]
    assert tokens_per_step(_model(UPPER_MEDUSA_DIR), adapter.medusa, prompts) >= MIN_TOKENS_PER_STEP
