"""Assertions shared by the adapter-source tests."""

from __future__ import annotations

from pathlib import Path

import torch

from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.peft_format import parse_peft_adapter


def assert_same_weights(adapter: LoraAdapter, reference_dir: Path) -> None:
    """The adapter holds exactly the tensors of the PEFT directory it came from."""
    ref = parse_peft_adapter(reference_dir)
    assert set(adapter.modules) == set(ref.modules)
    for key, m in ref.modules.items():
        got = adapter.modules[key]
        assert torch.equal(got.a, m.a) and torch.equal(got.b, m.b) and got.scale == m.scale, key
