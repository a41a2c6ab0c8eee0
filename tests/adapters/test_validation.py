"""`validate_adapter`: adapters that cannot work on the served model are refused with the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter, LoraModuleWeights
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.adapters.validation import validate_adapter
from loraserve.models.config import ModelConfig


@pytest.fixture
def cfg(tiny_llama) -> ModelConfig:
    return ModelConfig.from_dir(tiny_llama)


@pytest.fixture
def qv(peft_adapters) -> LoraAdapter:
    return parse_peft_adapter(peft_adapters["qv"])


def _with_modules(adapter: LoraAdapter, extra: dict) -> LoraAdapter:
    return dataclasses.replace(adapter, modules={**adapter.modules, **extra})


def test_real_adapters_pass(cfg, peft_adapters):
    for path in peft_adapters.values():
        assert validate_adapter(parse_peft_adapter(path), dataclasses.replace(cfg, name_or_path="")) == []


def test_other_base_model_name_only_warns(cfg, qv):
    warnings = validate_adapter(dataclasses.replace(qv, base_model_name="someone/other-model"), cfg)
    assert len(warnings) == 1 and "someone/other-model" in warnings[0]
    same = dataclasses.replace(qv, base_model_name=f"org/{cfg.name_or_path.rstrip('/').split('/')[-1]}")
    assert validate_adapter(same, cfg) == []


def test_shapes_of_another_model_refused(cfg, qv):
    wider = dataclasses.replace(cfg, hidden_size=96, head_dim=24)
    with pytest.raises(AdapterError, match="do not fit the model's projection"):
        validate_adapter(qv, wider)


def test_layer_out_of_range_refused(cfg, qv):
    bad = _with_modules(qv, {(cfg.num_hidden_layers, "q_proj"): qv.modules[(0, "q_proj")]})
    with pytest.raises(AdapterError, match=f"layer {cfg.num_hidden_layers} but the model has"):
        validate_adapter(bad, cfg)


def test_unknown_target_module_refused(cfg, qv):
    bad = dataclasses.replace(qv, config={**qv.config, "target_modules": ["q_proj", "c_attn"]})
    with pytest.raises(AdapterError, match="c_attn"):
        validate_adapter(bad, cfg)


def test_absurd_rank_refused(cfg, qv):
    h = cfg.hidden_size
    r = h + 1
    big = LoraModuleWeights(
        a=torch.zeros(r, h), b=torch.zeros(cfg.num_attention_heads * cfg.head_dim, r), scale=1.0
    )
    with pytest.raises(AdapterError, match="exceeds the projection"):
        validate_adapter(_with_modules(qv, {(0, "q_proj"): big}), cfg)
    with pytest.raises(AdapterError, match="maximum LoRA rank 2"):
        validate_adapter(qv, cfg, max_rank=2)


def test_non_finite_weights_refused(cfg, qv):
    m = qv.modules[(0, "v_proj")]
    a = m.a.clone()
    a[0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN"):
        validate_adapter(_with_modules(qv, {(0, "v_proj"): LoraModuleWeights(a, m.b, m.scale)}), cfg)


def test_store_refuses_mismatched_adapter(make_store, peft_adapters, tmp_path):
    """End to end: an adapter for a wider model is refused with 400 by the store."""
    import asyncio

    from tests.fixtures.tiny_models import make_peft_adapter, make_tiny_model

    other = make_tiny_model(tmp_path / "mistral", "mistral")
    adapter_dir = make_peft_adapter(other, tmp_path / "mistral-lora", r=4)
    with pytest.raises(AdapterError) as e:
        asyncio.run(make_store().get(str(adapter_dir), "local", None))
    assert e.value.status_code == 400 and "different base model" in str(e.value)
