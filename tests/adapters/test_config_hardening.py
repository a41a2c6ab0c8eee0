"""Crafted `adapter_config.json` files (issue 17): refused fast with a 400 naming the field.

`rank_pattern`/`alpha_pattern` keys used to be compiled as regular expressions on
a loader thread; a backtracking key held the GIL for seconds and froze the
server. Keys are now matched as module-name suffixes, and the scales that
PEFT itself computes for plain keys are unchanged (checked against PEFT below).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.peft_format import MAX_PATTERN_KEY_CHARS, MAX_PATTERN_KEYS, parse_peft_adapter
from loraserve.adapters.validation import validate_adapter
from loraserve.models.config import ModelConfig
from tests.fixtures.tiny_models import load_hf_model

PREFIX = "base_model.model.model.layers"
# Took 17 s per module under `re.match(rf"(.*\.)?{key}$", ...)`, holding the GIL throughout.
EVIL_KEY = r"(?=model\.layers\.0\.self_attn\.q)model(.|.)*Z"


def _write(out: Path, cfg: dict | list | str, r: int = 4, layers: int = 2) -> Path:
    """Two layers of q_proj/v_proj (32 -> 32) at rank `r`, with `cfg` as the config, verbatim."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            tensors[f"{PREFIX}.{layer}.self_attn.{module}.lora_A.weight"] = torch.randn(r, 32)
            tensors[f"{PREFIX}.{layer}.self_attn.{module}.lora_B.weight"] = torch.randn(32, r)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    text = cfg if isinstance(cfg, str) else json.dumps(cfg)
    (out / "adapter_config.json").write_text(text)
    return out


def _cfg(**over: object) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none", **over}


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_backtracking_pattern_key_is_refused_fast(tmp_path: Path, field: str) -> None:
    path = _write(tmp_path / "evil", _cfg(**{field: {EVIL_KEY: 4}}))
    t0 = time.perf_counter()
    with pytest.raises(AdapterError) as e:
        parse_peft_adapter(path)
    assert time.perf_counter() - t0 < 0.5
    assert e.value.status_code == 400
    assert field in str(e.value) and "matches no LoRA module" in str(e.value) and "(?=model" in str(e.value)


def test_many_evil_keys_and_huge_keys_are_bounded(tmp_path: Path) -> None:
    too_many = {f"k{i}": 4 for i in range(MAX_PATTERN_KEYS + 1)}
    with pytest.raises(AdapterError, match=f"at most {MAX_PATTERN_KEYS}"):
        parse_peft_adapter(_write(tmp_path / "many", _cfg(alpha_pattern=too_many)))
    long_key = "(a|a)*" * 200
    with pytest.raises(AdapterError, match=f"longer than {MAX_PATTERN_KEY_CHARS}") as e:
        parse_peft_adapter(_write(tmp_path / "long", _cfg(alpha_pattern={long_key: 4})))
    assert len(str(e.value)) < 300  # the key is shown cut short
    # Many keys that each match nothing: still linear work, refused quickly.
    keys = {f"{EVIL_KEY}{i}": 1.0 for i in range(MAX_PATTERN_KEYS)}
    t0 = time.perf_counter()
    with pytest.raises(AdapterError, match="and 9997 more"):
        parse_peft_adapter(_write(tmp_path / "lots", _cfg(alpha_pattern=keys)))
    assert time.perf_counter() - t0 < 1.0


def test_plain_keys_match_at_dot_boundaries_first_key_wins(tmp_path: Path) -> None:
    cfg = _cfg(
        rank_pattern={"model.layers.1.self_attn.v_proj": 4},
        alpha_pattern={"layers.0.self_attn.q_proj": 2, "q_proj": 12, "model.layers.1.self_attn.q_proj": 99},
    )
    adapter = parse_peft_adapter(_write(tmp_path / "ok", cfg))
    assert adapter.modules[(0, "q_proj")].scale == 2 / 4  # the first matching key in config order
    assert adapter.modules[(1, "q_proj")].scale == 12 / 4  # "q_proj" precedes the longer key
    assert adapter.modules[(0, "v_proj")].scale == 8 / 4  # no key: lora_alpha / r


def test_anchored_key_matches_the_whole_path_only(tmp_path: Path) -> None:
    """`^layers.0.self_attn.q_proj` is anchored at the start, where the path has `model.`: no match."""
    with pytest.raises(AdapterError, match="matches no LoRA module"):
        parse_peft_adapter(_write(tmp_path / "anch", _cfg(alpha_pattern={"^layers.0.self_attn.q_proj": 2})))
    ok = parse_peft_adapter(
        _write(tmp_path / "ok", _cfg(alpha_pattern={"^model.layers.0.self_attn.q_proj": 2}))
    )
    assert ok.modules[(0, "q_proj")].scale == 2 / 4 and ok.modules[(1, "q_proj")].scale == 8 / 4


def test_suffix_must_start_at_a_dot(tmp_path: Path) -> None:
    """`proj` is not a module name: PEFT's regex would not match `q_proj` with it either."""
    with pytest.raises(AdapterError, match="'proj' matches no LoRA module"):
        parse_peft_adapter(_write(tmp_path / "partial", _cfg(alpha_pattern={"proj": 2})))


def test_scales_equal_peft_own_on_a_real_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    """Same config through PEFT and through our parser: every module's scale is PEFT's `scaling`."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        # Both spellings PEFT's docs use: plain names and `^`-anchored full paths (escaped dots too).
        rank_pattern={"model.layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={
            r"^model\.layers\.1\.self_attn\.v_proj": 5,
            "v_proj": 3,
            "layers.0.self_attn.q_proj": 20,
            "^model.layers.2.mlp.down_proj$": 7,
        },
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = get_peft_model(load_hf_model(tiny_llama), cfg)
    model.save_pretrained(tmp_path / "peft")
    ours = parse_peft_adapter(tmp_path / "peft")
    validate_adapter(ours, ModelConfig.from_dir(tiny_llama))
    expected = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            layer = int(name.split(".layers.")[1].split(".")[0])
            expected[(layer, name.rsplit(".", 1)[-1])] = (module.r["default"], module.scaling["default"])
    assert expected and set(expected) == set(ours.modules)
    for key, (rank, scale) in expected.items():
        assert (ours.modules[key].rank, ours.modules[key].scale) == (rank, pytest.approx(scale)), key


BAD_CONFIGS = [
    ("alpha-string", _cfg(lora_alpha="16"), "lora_alpha"),
    ("alpha-nan", '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', "lora_alpha"),
    ("alpha-infinity", '{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity}', "lora_alpha"),
    ("alpha-1e38", _cfg(lora_alpha=1e38), "lora_alpha"),
    ("alpha-bool", _cfg(lora_alpha=True), "lora_alpha"),
    ("alpha-pattern-string", _cfg(alpha_pattern={"q_proj": "16"}), "alpha_pattern"),
    ("alpha-pattern-1e38", _cfg(alpha_pattern={"q_proj": 1e38}), "alpha_pattern"),
    ("alpha-pattern-list", _cfg(alpha_pattern=["q_proj"]), "alpha_pattern"),
    ("rank-pattern-zero", _cfg(rank_pattern={"q_proj": 0}), "rank_pattern"),
    ("rank-pattern-string", _cfg(rank_pattern={"q_proj": "4"}), "rank_pattern"),
    ("rank-float", _cfg(r=4.0), "rank"),
    ("rank-bool", _cfg(r=True), "rank"),
    ("config-a-list", [_cfg()], "JSON object"),
    ("config-a-string", '"LORA"', "JSON object"),
    ("config-nested-deeply", "[" * 100_000 + "]" * 100_000, "adapter_config.json"),
    ("config-int-of-5000-digits", '{"r": ' + "9" * 5000 + "}", "not valid JSON"),
    ("config-over-16-MiB", '{"pad": "' + " " * (16 << 20) + '"}', "at most"),
    ("target-modules-ints", _cfg(target_modules=[1, 2]), "target_modules"),
    ("target-modules-object", _cfg(target_modules={"q_proj": 1}), "target_modules"),
    ("rslora-string", _cfg(use_rslora="false"), "use_rslora"),
    ("base-model-a-number", _cfg(base_model_name_or_path=7), "base_model_name_or_path"),
    ("peft-type-huge", _cfg(peft_type="X" * 100_000), "unsupported adapter type"),
]


@pytest.mark.parametrize(("cfg", "field"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_malformed_config_is_a_400_naming_the_field(
    tmp_path: Path, tiny_llama: Path, cfg: object, field: str
) -> None:
    path = _write(tmp_path / "bad", cfg)  # type: ignore[arg-type]
    with pytest.raises(AdapterError) as e:
        adapter = parse_peft_adapter(path)
        validate_adapter(adapter, ModelConfig.from_dir(tiny_llama))
    assert e.value.status_code == 400 and field in str(e.value)
    assert len(str(e.value)) < 400


def test_scale_is_finite_and_bounded(tmp_path: Path) -> None:
    ok = parse_peft_adapter(_write(tmp_path / "big-but-fine", _cfg(lora_alpha=4000, r=4)))
    assert all(w.scale == 1000 for w in ok.modules.values())
    neg = parse_peft_adapter(_write(tmp_path / "negative", _cfg(lora_alpha=-8)))
    assert all(w.scale == -2 for w in neg.modules.values())  # negation adapters are legitimate
    with pytest.raises(AdapterError, match="LoRA scale"):
        parse_peft_adapter(_write(tmp_path / "huge", _cfg(lora_alpha=1e6)))


def test_crafted_tensor_name_is_refused_fast(tmp_path: Path) -> None:
    """Tensor names were matched by a regex that backtracked quadratically (33 s for this one)."""
    out = tmp_path / "names"
    out.mkdir()
    name = "layers.0." * 16_000 + "x"
    save_file({name: torch.zeros(1)}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(_cfg()))
    t0 = time.perf_counter()
    with pytest.raises(AdapterError, match="unexpected tensor") as e:
        parse_peft_adapter(out)
    assert time.perf_counter() - t0 < 0.5
    assert len(str(e.value)) < 300


def test_an_unreadable_config_is_an_adapter_error_not_a_500(tmp_path: Path) -> None:
    """Root reads any file, so unreadability is a directory where the config should be."""
    (tmp_path / "adapter_config.json").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="cannot be read"):
        parse_peft_adapter(tmp_path)
