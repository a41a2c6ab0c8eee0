"""`parse_peft_adapter` reads tensor names generically; the model's module list is validation's business."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.adapters.validation import validate_adapter
from loraserve.models.config import ModelConfig

PREFIX = "base_model.model.model.layers"


def _write_adapter(
    out: Path, tensors: dict[str, torch.Tensor], r: int = 4, alpha: float = 8.0, **cfg: object
) -> Path:
    """A PEFT-layout directory written by hand, for architectures the test models do not have."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "bias": "none", **cfg}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def _pair(path: str, r: int, in_f: int, out_f: int, name: str = "") -> dict[str, torch.Tensor]:
    suffix = f".{name}" if name else ""
    return {
        f"{path}.lora_A{suffix}.weight": torch.randn(r, in_f),
        f"{path}.lora_B{suffix}.weight": torch.randn(out_f, r),
    }


def test_phi3_style_fused_projections_parse(tmp_path: Path) -> None:
    tensors = {
        **_pair(f"{PREFIX}.0.self_attn.qkv_proj", 4, 32, 96),
        **_pair(f"{PREFIX}.0.mlp.gate_up_proj", 4, 32, 128),
        **_pair(f"{PREFIX}.1.self_attn.qkv_proj", 4, 32, 96),
    }
    adapter = parse_peft_adapter(_write_adapter(tmp_path / "phi3", tensors))
    assert set(adapter.modules) == {(0, "qkv_proj"), (0, "gate_up_proj"), (1, "qkv_proj")}
    assert adapter.target_modules == ("gate_up_proj", "qkv_proj")
    assert tuple(adapter.modules[(0, "qkv_proj")].b.shape) == (96, 4)
    assert adapter.modules[(0, "qkv_proj")].scale == 8.0 / 4


def test_patterns_match_the_full_module_path(tmp_path: Path) -> None:
    """rank_pattern/alpha_pattern keys are matched against `model.layers.<i>.<path>`, as PEFT does."""
    tensors = {
        **_pair(f"{PREFIX}.0.self_attn.qkv_proj", 8, 32, 96),
        **_pair(f"{PREFIX}.1.self_attn.qkv_proj", 4, 32, 96),
        **_pair(f"{PREFIX}.0.mlp.gate_up_proj", 4, 32, 128),
    }
    path = _write_adapter(
        tmp_path / "patterns",
        tensors,
        rank_pattern={"model.layers.0.self_attn.qkv_proj": 8},
        alpha_pattern={"mlp.gate_up_proj": 2.0},
    )
    adapter = parse_peft_adapter(path)
    assert adapter.modules[(0, "qkv_proj")].rank == 8
    assert adapter.modules[(0, "qkv_proj")].scale == 8.0 / 8
    assert adapter.modules[(1, "qkv_proj")].scale == 8.0 / 4
    assert adapter.modules[(0, "gate_up_proj")].scale == 2.0 / 4


def test_adapter_name_in_key_accepted(tmp_path: Path) -> None:
    tensors = _pair(f"{PREFIX}.2.self_attn.q_proj", 4, 32, 32, name="default")
    adapter = parse_peft_adapter(_write_adapter(tmp_path / "named", tensors))
    assert set(adapter.modules) == {(2, "q_proj")}


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, "not a LoRA A/B weight"),
        (
            {f"{PREFIX}.0.self_attn.q_proj.lora_embedding_A.weight": torch.zeros(4, 32)},
            "not a LoRA A/B weight",
        ),
        (
            {
                **_pair(f"{PREFIX}.0.self_attn.q_proj", 4, 32, 32),
                **_pair(f"{PREFIX}.0.cross.q_proj", 4, 32, 32),
            },
            "two LoRA modules named 'q_proj'",
        ),
        ({f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}, "without its partner"),
    ],
    ids=["outside-layers", "embedding-lora", "same-name-two-paths", "unpaired"],
)
def test_malformed_keys_refused(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        parse_peft_adapter(_write_adapter(tmp_path / "bad", tensors))


def test_module_the_model_lacks_is_refused_by_validation(tmp_path: Path, tiny_llama: Path) -> None:
    """A Phi-3 adapter parses, but a Llama model has no `qkv_proj`: validation says so, naming both."""
    cfg = ModelConfig.from_dir(tiny_llama)
    h = cfg.hidden_size
    path = _write_adapter(tmp_path / "phi3-on-llama", _pair(f"{PREFIX}.0.self_attn.qkv_proj", 4, h, 3 * h))
    adapter = parse_peft_adapter(path)
    with pytest.raises(AdapterError) as e:
        validate_adapter(adapter, cfg)
    message = str(e.value)
    assert "'qkv_proj'" in message and "does not have" in message
    assert ", ".join(cfg.linear_shapes()) in message  # lists what the model does have
