"""`save_as_peft`: a merged adapter written out loads in PEFT with the right tensors and scales."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils

from loraserve.adapters.merge import MergeSpec, merge_adapters
from loraserve.adapters.peft_format import parse_peft_adapter
from tests.adapters.merge_fixtures import build_assets, raw_lora_tensors
from tests.fixtures.peft_export import module_path, save_as_peft
from tests.fixtures.tiny_models import load_hf_model

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64, 120, 5]])


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return build_assets(tmp_path_factory.mktemp("export"))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def _oracle_peft_model(model_dir: Path, adapter_dirs: list[Path], weights: list[float], fn, **kw):
    """PEFT model with the first adapter's config, loaded with merged tensors from PEFT's merge utils."""
    first_cfg = json.loads((adapter_dirs[0] / "adapter_config.json").read_text())
    raws = [raw_lora_tensors(d) for d in adapter_dirs]
    slots = sorted({s for r in raws for s in r})
    cfg = LoraConfig(
        r=first_cfg["r"],
        lora_alpha=first_cfg["lora_alpha"],
        use_rslora=first_cfg.get("use_rslora", False),
        target_modules=sorted({m for _, m in slots}),
        lora_dropout=0.0,
    )
    model = get_peft_model(load_hf_model(model_dir), cfg)
    params = dict(model.named_parameters())
    w = torch.tensor(weights)
    with torch.no_grad():
        for slot in slots:
            idx = [i for i, r in enumerate(raws) if slot in r]
            for side in ("A", "B"):
                merged = fn([raws[i][slot][side] for i in idx], w[idx], **kw)
                params[f"base_model.model.{module_path(*slot)}.lora_{side}.default.weight"].copy_(merged)
    model.eval()
    return model


@pytest.mark.parametrize(
    ("strategy", "fn", "kw"),
    [
        ("linear", merge_utils.task_arithmetic, {}),
        ("ties", merge_utils.ties, {"density": 0.6, "majority_sign_method": "total"}),
    ],
)
def test_exported_merge_gives_oracle_logits(tmp_path: Path, assets, strategy: str, fn, kw: dict) -> None:
    model_dir, dirs = assets
    names, weights = ["a1", "a2", "a3"], [0.6, 1.2, -0.4]
    adapters = [parse_peft_adapter(dirs[n], key=n) for n in names]
    spec = MergeSpec(ids=names, weights=weights, merge_strategy=strategy, density=kw.get("density", 1.0))
    merged = merge_adapters(adapters, spec, spec.cache_key(names))
    out = save_as_peft(merged, tmp_path / "merged")

    ours = PeftModel.from_pretrained(load_hf_model(model_dir), out)
    ours.eval()
    oracle = _oracle_peft_model(model_dir, [dirs[n] for n in names], weights, fn, **kw)
    got, want = _logits(ours), _logits(oracle)
    base = _logits(load_hf_model(model_dir))
    assert (want - base).abs().max() > 1e-2  # the merged adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_export_round_trips_through_parser(tmp_path: Path, assets) -> None:
    _, dirs = assets
    adapters = [parse_peft_adapter(dirs[n], key=n) for n in ("a2", "a3")]
    spec = MergeSpec(ids=["a2", "a3"], weights=[1.0, 0.5], merge_strategy="dare_ties", density=0.5)
    merged = merge_adapters(adapters, spec, spec.cache_key(["a2", "a3"]))
    back = parse_peft_adapter(save_as_peft(merged, tmp_path / "m"), key="back")
    assert (back.rank, back.alpha, back.target_modules) == (merged.rank, merged.alpha, merged.target_modules)
    assert set(back.modules) == set(merged.modules)
    for slot, m in merged.modules.items():
        assert torch.equal(back.modules[slot].a, m.a) and torch.equal(back.modules[slot].b, m.b)
        assert back.modules[slot].scale == m.scale == 32 / 8


def test_export_keeps_per_module_scales_for_peft(tmp_path: Path, assets) -> None:
    """A non-uniform scale becomes an alpha_pattern entry that PEFT and our parser both honour."""
    model_dir, dirs = assets
    adapter = parse_peft_adapter(dirs["a1"], key="a1")
    adapter.modules[(1, "v_proj")].scale = 0.75
    out = save_as_peft(adapter, tmp_path / "odd")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 6.0}
    assert cfg["init_lora_weights"] is True
    back = parse_peft_adapter(out, key="odd")
    assert {s: m.scale for s, m in back.modules.items()} == {s: m.scale for s, m in adapter.modules.items()}
    peft_model = PeftModel.from_pretrained(load_hf_model(model_dir), out)
    layers = peft_model.base_model.model.model.layers
    assert layers[1].self_attn.v_proj.scaling["default"] == pytest.approx(0.75)
    assert layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(2.0)
    assert layers[1].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)
