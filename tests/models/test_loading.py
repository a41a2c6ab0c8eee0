"""Checkpoint layouts and dtypes: sharded safetensors, and low-precision serving."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from loraserve.engine.engine import Engine, EngineConfig
from loraserve.models.weights import checkpoint_files
from tests.fixtures.native import panel_kernels_or_skip
from tests.fixtures.tiny_models import load_hf_model, make_tokenizer

PROMPT = [1, 17, 33, 90, 5, 61, 7, 200, 3]


def small_engine(path: Path, dtype: str = "float32") -> Engine:
    return Engine.from_pretrained(
        path, EngineConfig(dtype=dtype, kv_cache_memory_bytes=16 << 20, adapter_memory_bytes=16 << 20)
    )


def test_sharded_checkpoint_loads_like_the_single_file(llama_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    load_hf_model(llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    make_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(sharded)) > 1
    torch.testing.assert_close(
        small_engine(sharded).prompt_logits(PROMPT), small_engine(llama_dir).prompt_logits(PROMPT)
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_serving_tracks_float32(llama_dir: Path, dtype: str) -> None:
    ref = small_engine(llama_dir).prompt_logits(PROMPT)
    low = small_engine(llama_dir, dtype).prompt_logits(PROMPT)
    assert low.dtype == torch.float32  # logits are always returned in float32 for sampling
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_tied_embedding_is_read_from_the_packed_head(tiny_model_dirs: dict[str, Path]) -> None:
    """With panel-packed weights a tied model keeps one vocabulary matrix, and still gives
    transformers' logits; an untied model keeps its own embedding."""
    panel_kernels_or_skip()
    qwen = small_engine(tiny_model_dirs["qwen2"])
    assert qwen.runner.model.lm_head.layout == "panel" and qwen.runner.model.embed is None
    with torch.no_grad():
        ref = load_hf_model(tiny_model_dirs["qwen2"])(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(qwen.prompt_logits(PROMPT), ref, rtol=1e-4, atol=1e-4)
    assert small_engine(tiny_model_dirs["llama"]).runner.model.embed is not None


def test_packed_model_lets_go_of_the_checkpoint_mapping(llama_dir: Path, tmp_path: Path) -> None:
    """Once every matrix is packed, no tensor may still view the mapped checkpoint file (it
    would keep the whole file resident)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    own = tmp_path / "model"
    shutil.copytree(llama_dir, own)
    engine = small_engine(own)
    if not engine.runner.model.lm_head.packed:
        pytest.skip("no packed layout here (no oneDNN, no native kernels)")
    gc.collect()
    assert str(own / "model.safetensors") not in maps.read_text()
    torch.testing.assert_close(engine.prompt_logits(PROMPT), small_engine(llama_dir).prompt_logits(PROMPT))


def test_loading_hands_freed_memory_back_as_it_reads(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is read tensor by tensor as the model asks (LazyWeights), and malloc is
    told to return freed memory every TRIM_EVERY bytes read, so a load's temporaries do not pile
    up between the packed weights."""
    from loraserve.models import weights

    trims: list[int] = []
    monkeypatch.setattr(weights, "return_freed_memory", lambda: trims.append(1) or True)
    per_layer, top = weights.load_checkpoint(llama_dir, 3, torch.float32, torch.device("cpu"))
    assert not trims and "model.embed_tokens.weight" in top  # nothing read yet
    total = sum(top[k].nbytes for k in top) + sum(w[k].nbytes for w in per_layer for k in w)
    assert not trims  # under TRIM_EVERY
    monkeypatch.setattr(weights, "TRIM_EVERY", total // 4)
    per_layer, top = weights.load_checkpoint(llama_dir, 3, torch.float32, torch.device("cpu"))
    for w in [top, *per_layer]:
        for k in w:
            w[k]
    assert 3 <= len(trims) <= 4
