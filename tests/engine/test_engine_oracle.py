"""Our engine against transformers + peft on the same weights: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.layers.decode_stack import DecodeStack
from loraserve.layers.native_cpu import ENV_MARCH
from tests.fixtures.call_counter import count_taken
from tests.fixtures.native import AVX2, native_kernel_or_skip
from tests.fixtures.tiny_models import hf_greedy, load_hf_model

PROMPTS = [
    [1, 17, 33, 90, 5, 61, 7],
    [1, 200, 3, 44],
    [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6],
    [1, 301],
    [1, 64, 128, 12, 99, 100, 101, 102, 103, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 40, 41],
]


def make_engine(path: Path, **kw) -> Engine:
    return Engine.from_pretrained(
        path, EngineConfig(kv_cache_memory_bytes=64 << 20, adapter_memory_bytes=64 << 20, **kw)
    )


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_logits_and_greedy_match_transformers(tiny_model_dirs: dict[str, Path], arch: str) -> None:
    path = tiny_model_dirs[arch]
    hf = load_hf_model(path)
    engine = make_engine(path)
    for ids in PROMPTS:
        ours = engine.prompt_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    params = SamplingParams(max_new_tokens=32, ignore_eos_token=True)
    results = engine.generate(PROMPTS, params)
    for ids, res in zip(PROMPTS, results):
        assert [t.id for t in res.tokens] == hf_greedy(hf, ids, 32)
        assert res.finish_reason == "length"
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


@pytest.mark.parametrize("lora_path", ["native", AVX2, "torch"])
def test_mixed_adapter_batch_matches_peft_per_row(
    llama_dir: Path, llama_adapters: list[Path], lora_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every path (the native CPU kernels of the host's build and of the AVX2 one, and PyTorch)
    against PEFT."""
    from peft import PeftModel

    native = lora_path != "torch"
    if native:
        kernels = native_kernel_or_skip(lora_path)
    if lora_path == AVX2:  # an engine loads the build LORASERVE_NATIVE_MARCH names
        monkeypatch.setenv(ENV_MARCH, AVX2)
    stack_calls: list[bool] = []  # decode steps take the one-call layer stack (layers/decode_stack.py)
    if native:
        stack_calls = count_taken(monkeypatch, DecodeStack, "__call__")
    engine = make_engine(llama_dir, max_active_adapters=8, max_lora_rank=16, native_kernels=native)
    assert (engine.ops_name == "cpu-native") == native
    if native:
        assert engine.runner.ops.kernels is kernels
    adapters = [parse_peft_adapter(p) for p in llama_adapters]
    # 8 adapter rows + 2 base rows, prompts of different lengths, all in one continuous batch
    rows = [(PROMPTS[i % len(PROMPTS)], adapters[i], llama_adapters[i]) for i in range(8)]
    rows += [(PROMPTS[0], None, None), (PROMPTS[2], None, None)]
    params = SamplingParams(max_new_tokens=16, ignore_eos_token=True)
    results = engine.generate([r[0] for r in rows], params, [r[1] for r in rows])
    base = load_hf_model(llama_dir)
    for (ids, adapter, path), res in zip(rows, results):
        if path is None:
            ref_model = base
        else:
            ref_model = PeftModel.from_pretrained(load_hf_model(llama_dir), path).eval()
        assert [t.id for t in res.tokens] == hf_greedy(ref_model, ids, 16), f"row with adapter {path}"
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(engine.prompt_logits(ids, adapter), ref, atol=1e-4, rtol=1e-4)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
    assert engine.stats()["adapter_slots_in_use"] == 0
    if native:  # prefill steps fell back to the model's loop, decode steps did not
        assert any(stack_calls) and not all(stack_calls)


def test_lora_actually_changes_output(llama_dir: Path, llama_adapters: list[Path]) -> None:
    engine = make_engine(llama_dir, max_lora_rank=16)
    adapter = parse_peft_adapter(llama_adapters[3])
    base = engine.prompt_logits(PROMPTS[0])
    tuned = engine.prompt_logits(PROMPTS[0], adapter)
    assert (base - tuned).abs().max() > 1e-2
