"""Medusa adapter files: parsing v1/v2, `.pt` fallback, bad files, LoRA + Medusa, and every source."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter
from loraserve.adapters.medusa_format import is_adapter_dir, parse_adapter_dir, parse_medusa_heads
from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.adapters.sources.base import pick_adapter_files
from loraserve.adapters.validation import validate_medusa
from loraserve.models.config import ModelConfig
from tests.adapters.adapter_asserts import assert_same_weights
from tests.fixtures.medusa_heads import (
    add_medusa_heads,
    make_medusa_adapter,
    medusa_state_dict,
    write_medusa_files,
)

H, V = 64, 384  # tiny_llama's hidden size and vocabulary


@pytest.fixture
def cfg(tiny_llama: Path) -> ModelConfig:
    return ModelConfig.from_dir(tiny_llama)


def _cfg(**kw) -> dict:
    return {"medusa_num_heads": 3, "medusa_num_layers": 1, "base_model_name_or_path": "tiny-llama", **kw}


# ---- parsing -----------------------------------------------------------------------------------


def test_v2_heads_parse_to_stacked_tensors(tmp_path: Path, cfg: ModelConfig) -> None:
    d = make_medusa_adapter(tmp_path / "m", H, V, num_heads=4, seed=3)
    heads = parse_medusa_heads(d, key="k")
    raw = load_file(str(d / "medusa_lm_head.safetensors"))
    assert (heads.num_heads, heads.num_layers, heads.version) == (4, 1, 2)
    assert heads.weight.shape == (4, 1, H, H) and heads.bias.shape == (4, 1, H)
    assert heads.proj is None and heads.uses_base_lm_head
    for i in range(4):
        assert torch.equal(heads.weight[i, 0], raw[f"{i}.0.linear.weight"])
        assert torch.equal(heads.bias[i, 0], raw[f"{i}.0.linear.bias"])
    assert heads.base_model_name == "tiny-llama" and heads.key == "k"
    assert heads.nbytes == 4 * (H * H + H) * 4
    validate_medusa(heads, cfg)


def test_v1_heads_with_own_projection_from_pt(tmp_path: Path, cfg: ModelConfig) -> None:
    d = make_medusa_adapter(tmp_path / "m", H, V, num_heads=2, num_layers=2, own_proj=True, fmt="pt", seed=5)
    assert not (d / "medusa_lm_head.safetensors").exists()
    raw = torch.load(str(d / "medusa_lm_head.pt"), weights_only=True)
    heads = parse_medusa_heads(d)
    assert (heads.num_heads, heads.num_layers, heads.version) == (2, 2, 1)
    assert heads.proj is not None and heads.proj.shape == (2, V, H)
    assert torch.equal(heads.weight[1, 1], raw["1.1.linear.weight"])
    assert torch.equal(heads.proj[1], raw["1.2.weight"])
    validate_medusa(heads, cfg)


def test_version_defaults_to_1_and_accepts_whole_floats(tmp_path: Path) -> None:
    sd = medusa_state_dict(H, V, 3)
    assert parse_medusa_heads(write_medusa_files(tmp_path / "a", sd, _cfg())).version == 1
    assert parse_medusa_heads(write_medusa_files(tmp_path / "b", sd, _cfg(version=2.0))).version == 2
    # medusa_num_layers defaults to 1 like the Medusa project's config class
    no_layers = {k: v for k, v in _cfg().items() if k != "medusa_num_layers"}
    assert parse_medusa_heads(write_medusa_files(tmp_path / "c", sd, no_layers)).num_layers == 1
    # base_model_name_or_path is optional: LoRAX needs it, but nothing here depends on it
    bare = {"medusa_num_heads": 3, "medusa_num_layers": 1}
    assert parse_medusa_heads(write_medusa_files(tmp_path / "d", sd, bare)).base_model_name is None


def test_safetensors_preferred_over_pt(tmp_path: Path) -> None:
    d = make_medusa_adapter(tmp_path / "m", H, V, seed=1)
    torch.save(medusa_state_dict(H, V, 3, seed=2), str(d / "medusa_lm_head.pt"))
    heads = parse_medusa_heads(d)
    assert torch.equal(
        heads.weight[0, 0], load_file(str(d / "medusa_lm_head.safetensors"))["0.0.linear.weight"]
    )


def test_extra_heads_in_file_are_dropped(tmp_path: Path) -> None:
    """Published checkpoints exist whose config names fewer heads than the file holds."""
    sd = medusa_state_dict(H, V, 5, own_proj=True)
    heads = parse_medusa_heads(write_medusa_files(tmp_path / "m", sd, _cfg(medusa_num_heads=2), fmt="pt"))
    assert heads.num_heads == 2 and heads.proj is not None and heads.proj.shape[0] == 2


def test_medusa_head_prefix_is_accepted(tmp_path: Path) -> None:
    sd = {f"medusa_head.{k}": v for k, v in medusa_state_dict(H, V, 3).items()}
    assert parse_medusa_heads(write_medusa_files(tmp_path / "m", sd, _cfg())).num_heads == 3


def test_bfloat16_weights_are_read_as_float32(tmp_path: Path) -> None:
    sd = {k: v.bfloat16() for k, v in medusa_state_dict(H, V, 3).items()}
    heads = parse_medusa_heads(write_medusa_files(tmp_path / "m", sd, _cfg()))
    assert heads.weight.dtype == torch.float32
    moved = heads.to("cpu", torch.bfloat16)
    assert moved.weight.dtype == moved.bias.dtype == torch.bfloat16 and heads.weight.dtype == torch.float32


# ---- bad files -----------------------------------------------------------------------------------


def _write(tmp_path: Path, sd: dict, config: dict, fmt: str = "safetensors") -> Path:
    return write_medusa_files(tmp_path / "bad", sd, config, fmt)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"medusa_num_layers": 1}, "no medusa_num_heads"),
        (_cfg(medusa_num_heads=0), "medusa_num_heads must be an integer"),
        (_cfg(medusa_num_heads="3"), "medusa_num_heads must be an integer"),
        (_cfg(medusa_num_heads=True), "medusa_num_heads must be an integer"),
        (_cfg(medusa_num_heads=1000), "medusa_num_heads must be an integer"),
        (_cfg(medusa_num_layers=-1), "medusa_num_layers must be an integer"),
        (_cfg(version="2"), "version must be a whole number"),
        (_cfg(version=1.5), "version must be a whole number"),
        (_cfg(version=0), "version must be a whole number"),
    ],
)
def test_bad_config_values(tmp_path: Path, config: dict, match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        parse_medusa_heads(_write(tmp_path, medusa_state_dict(H, V, 3), config))


def test_bad_config_json(tmp_path: Path) -> None:
    d = _write(tmp_path, medusa_state_dict(H, V, 3), _cfg())
    (d / "config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="config.json is not valid JSON"):
        parse_medusa_heads(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="JSON object"):
        parse_medusa_heads(d)
    (d / "config.json").unlink()
    with pytest.raises(AdapterError, match="no config.json"):
        parse_medusa_heads(d)


def test_missing_and_corrupt_weights(tmp_path: Path) -> None:
    d = _write(tmp_path, medusa_state_dict(H, V, 3), _cfg())
    data = (d / "medusa_lm_head.safetensors").read_bytes()
    (d / "medusa_lm_head.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        parse_medusa_heads(d)
    (d / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(AdapterError, match="neither medusa_lm_head.safetensors nor medusa_lm_head.pt"):
        parse_medusa_heads(d)


class _Payload:
    """Any non-tensor object in a pickle: `weights_only=True` must refuse to build it."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pt_with_pickled_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_cfg()))
    torch.save({"0.0.linear.weight": torch.zeros(H, H), "x": _Payload()}, str(d / "medusa_lm_head.pt"))
    with pytest.raises(AdapterError, match="could not be loaded safely"):
        parse_medusa_heads(d)
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save([torch.zeros(2)], str(d / "medusa_lm_head.pt"))
    with pytest.raises(AdapterError, match="dict of named tensors"):
        parse_medusa_heads(d)


def _without(sd: dict, name: str) -> dict:
    return {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize(
    ("mutate", "config", "match"),
    [
        (lambda sd: _without(sd, "2.0.linear.bias"), _cfg(), r"lack '2.0.linear.bias'.*3 heads"),
        (lambda sd: _without(sd, "1.0.linear.weight"), _cfg(), r"lack '1.0.linear.weight'"),
        (
            lambda sd: {**sd, "lm_head.weight": torch.zeros(V, H)},
            _cfg(),
            "unexpected tensor 'lm_head.weight'",
        ),
        (lambda sd: {**sd, "0.1.bias": torch.zeros(V)}, _cfg(), "unexpected tensor '0.1.bias'"),
        (
            lambda sd: {**sd, "0.2.linear.weight": torch.zeros(H, H)},
            _cfg(),
            "unexpected tensor '0.2.linear.weight'",
        ),
        (lambda sd: {**sd, "0.1.weight": torch.zeros(V, H)}, _cfg(), r"only some Medusa heads \(0\)"),
        (lambda sd: {**sd, "0.0.linear.weight": torch.zeros(H, H + 1)}, _cfg(), "must be square"),
        (
            lambda sd: {**sd, "1.0.linear.weight": torch.zeros(H + 2, H + 2)},
            _cfg(),
            "do not match hidden size",
        ),
        (lambda sd: {**sd, "1.0.linear.bias": torch.zeros(H + 1)}, _cfg(), "do not match hidden size"),
        (
            lambda sd: (
                {k: v for k, v in sd.items() if ".linear." not in k} | {"0.0.weight": torch.zeros(V, H)}
            ),
            _cfg(medusa_num_heads=1, medusa_num_layers=0),
            None,
        ),  # v1 with no blocks is valid
        (lambda sd: {}, _cfg(medusa_num_layers=0), "repeat the base logits"),
    ],
)
def test_bad_tensors(tmp_path: Path, mutate, config: dict, match: str | None) -> None:
    d = _write(tmp_path, mutate(medusa_state_dict(H, V, 3)), config)
    if match is None:
        heads = parse_medusa_heads(d)
        assert heads.num_layers == 0 and heads.weight.shape == (1, 0, H, H)
        return
    with pytest.raises(AdapterError, match=match):
        parse_medusa_heads(d)


def test_validation_against_the_model(tmp_path: Path, cfg: ModelConfig) -> None:
    with pytest.raises(AdapterError, match="hidden size 32 but the model's is 64"):
        validate_medusa(parse_medusa_heads(make_medusa_adapter(tmp_path / "a", 32, V)), cfg)
    with pytest.raises(AdapterError, match="vocabulary of 500 tokens but the model has 384"):
        validate_medusa(parse_medusa_heads(make_medusa_adapter(tmp_path / "b", H, 500, own_proj=True)), cfg)
    sd = medusa_state_dict(H, V, 3)
    sd["1.0.linear.bias"][3] = float("nan")
    with pytest.raises(AdapterError, match="NaN or infinity"):
        validate_medusa(parse_medusa_heads(write_medusa_files(tmp_path / "c", sd, _cfg())), cfg)


# ---- LoRA + Medusa and the adapter type ------------------------------------------------------------


def test_medusa_only_adapter_has_no_lora_modules(tmp_path: Path) -> None:
    d = make_medusa_adapter(tmp_path / "m", H, V)
    assert is_adapter_dir(d)
    adapter = parse_adapter_dir(d, key="local:m")
    assert adapter.modules == {} and adapter.rank == 0 and adapter.max_rank == 0
    assert adapter.medusa is not None and adapter.medusa.key == "local:m"
    assert adapter.nbytes == adapter.medusa.nbytes > 0
    assert adapter.base_model_name == "tiny-llama"


def test_lora_plus_medusa_directory_returns_both(tmp_path: Path, peft_adapters: dict[str, Path]) -> None:
    d = shutil.copytree(peft_adapters["qv"], tmp_path / "qv-medusa")
    add_medusa_heads(d, H, V, num_heads=2)
    adapter = parse_adapter_dir(d)
    assert_same_weights(adapter, peft_adapters["qv"])
    assert adapter.medusa is not None and adapter.medusa.num_heads == 2
    plain = parse_peft_adapter(peft_adapters["qv"])
    assert adapter.nbytes == plain.nbytes + adapter.medusa.nbytes
    assert parse_adapter_dir(peft_adapters["qv"]).medusa is None  # a plain LoRA stays plain


def test_lora_dir_with_unrelated_config_json_is_plain_lora(
    tmp_path: Path, peft_adapters: dict[str, Path]
) -> None:
    d = shutil.copytree(peft_adapters["qv"], tmp_path / "qv")
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no medusa weights beside it
    assert parse_adapter_dir(d).medusa is None


def test_empty_directory_and_empty_adapter_are_refused(tmp_path: Path) -> None:
    assert not is_adapter_dir(tmp_path)
    with pytest.raises(AdapterError, match="neither a PEFT LoRA .* nor Medusa heads"):
        parse_adapter_dir(tmp_path)
    with pytest.raises(AdapterError, match="neither LoRA weights nor Medusa heads"):
        LoraAdapter(key="x", rank=0, alpha=0.0, use_rslora=False, target_modules=(), modules={})


def test_pick_adapter_files() -> None:
    lora = ["adapter_config.json", "adapter_model.safetensors"]
    assert (
        pick_adapter_files(lora + ["config.json", "README.md"], "x") == lora
    )  # config.json alone: no Medusa
    medusa = ["config.json", "medusa_lm_head.safetensors"]
    assert pick_adapter_files(medusa + ["medusa_lm_head.pt"], "x") == medusa
    assert pick_adapter_files(["config.json", "medusa_lm_head.pt"], "x") == [
        "config.json",
        "medusa_lm_head.pt",
    ]
    assert pick_adapter_files(lora + medusa, "x") == lora + medusa
    with pytest.raises(AdapterError, match="medusa_lm_head.pt but no config.json"):
        pick_adapter_files(["medusa_lm_head.pt"], "x")
    with pytest.raises(AdapterError, match="not a PEFT LoRA adapter"):
        pick_adapter_files(["config.json", "model.safetensors"], "x")


# ---- through the AdapterStore and its sources ----------------------------------------------------


def _medusa_and_combined(tmp_path: Path, peft_adapters: dict[str, Path]) -> tuple[Path, Path]:
    medusa = make_medusa_adapter(tmp_path / "medusa", H, V, num_heads=3, seed=7)
    combined = add_medusa_heads(
        shutil.copytree(peft_adapters["all"], tmp_path / "all-medusa"), H, V, 2, seed=8
    )
    return medusa, combined


def _check(adapter: LoraAdapter, expected_dir: Path, lora_dir: Path | None) -> None:
    want = parse_medusa_heads(expected_dir)
    assert adapter.medusa is not None
    assert torch.equal(adapter.medusa.weight, want.weight) and torch.equal(adapter.medusa.bias, want.bias)
    if lora_dir is None:
        assert adapter.modules == {}
    else:
        assert_same_weights(adapter, lora_dir)


def test_local_source(make_store, peft_adapters, tmp_path: Path) -> None:
    medusa, combined = _medusa_and_combined(tmp_path, peft_adapters)
    store = make_store()
    _check(asyncio.run(store.get(str(medusa), "local", None)), medusa, None)
    _check(asyncio.run(store.get(str(combined), "local", None)), combined, peft_adapters["all"])
    assert store.stats()["loads"] == 2
    asyncio.run(store.get(str(medusa), "local", None))
    assert store.stats()["hits"] == 1
    # the heads are part of the local revision: rewritten heads pin new weights
    src = store.sources["local"]
    before = src.resolve(str(medusa), None, None)
    save_file(medusa_state_dict(H, V, 3, seed=9), str(medusa / "medusa_lm_head.safetensors"))
    assert src.resolve(str(medusa), None, None).revision != before.revision


def test_store_refuses_heads_for_another_model(make_store, tmp_path: Path) -> None:
    d = make_medusa_adapter(tmp_path / "wide", 96, V)
    with pytest.raises(AdapterError, match="hidden size 96") as e:
        asyncio.run(make_store().get(str(d), "local", None))
    assert e.value.status_code == 400


def test_hub_source(make_store, fake_hub, peft_adapters, tmp_path: Path) -> None:
    medusa, combined = _medusa_and_combined(tmp_path, peft_adapters)
    (medusa / "README.md").write_text("not downloaded")
    fake_hub.add_repo("org/medusa", medusa)
    fake_hub.add_repo("org/lora-medusa", combined)
    store = make_store(hub=fake_hub)
    _check(asyncio.run(store.get("org/medusa", "hub", None)), medusa, None)
    assert fake_hub.count("GET", "/resolve/") == 2  # config.json + heads, nothing else
    _check(asyncio.run(store.get("org/lora-medusa", "hub", None)), combined, peft_adapters["all"])


def test_s3_and_pbase_sources(make_store, s3_env, fake_pbase, peft_adapters, tmp_path: Path) -> None:
    medusa, combined = _medusa_and_combined(tmp_path, peft_adapters)
    uri = s3_env.upload_dir(medusa, "medusa-bucket", "heads/v2")
    fake_pbase.tokens.add("pb-token")
    fake_pbase.add_v2("medusa-repo", "1", s3_env.upload_dir(combined, "medusa-bucket", "repos/lm/1"))
    store = make_store(pbase=fake_pbase)
    _check(asyncio.run(store.get(uri, "s3", None)), medusa, None)
    _check(asyncio.run(store.get("medusa-repo/1", "pbase", "pb-token")), combined, peft_adapters["all"])
