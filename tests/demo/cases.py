"""Held-out demo cases shared by every check of the bundled demo assets.

`scripts/make_demo.py` writes `demo/heldout_cases.json` next to the model: inputs
chosen by a hash rule that training never sees. Both the `transformers`
reference check and checks through loraserve's own engine read them from here,
so they grade exactly the same prompts.
"""

from __future__ import annotations

import json
import zlib
from functools import cache
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
MODEL_DIR = DEMO_DIR / "model"
TASKS = ("reverse", "upper", "add")
HELD_OUT_MODULUS = 7  # keep in step with scripts/demo_tasks.py


def adapter_dir(task: str) -> Path:
    return DEMO_DIR / "adapters" / task


@cache
def _heldout() -> dict:
    return json.loads((DEMO_DIR / "heldout_cases.json").read_text())


def demo_cases(task: str) -> list[tuple[str, str]]:
    """(raw prompt, expected answer) pairs; the prompt already holds the chat markers."""
    return [(c["prompt"], c["expected"]) for c in _heldout()["cases"][task]]


def demo_inputs(task: str) -> list[str]:
    """The bare user texts behind `demo_cases`, for chat-template (OpenAI) checks."""
    return [c["input"] for c in _heldout()["cases"][task]]


def is_held_out(text: str) -> bool:
    return zlib.crc32(text.encode()) % HELD_OUT_MODULUS == 0


def exact_match(got: list[str], cases: list[tuple[str, str]]) -> float:
    return sum(g == want for g, (_, want) in zip(got, cases, strict=True)) / len(cases)
