"""`--kv-cache-dtype`: a bf16 KV cache under fp32 activations, on both CPU backends.

The oracle for the native kernel is the PyTorch path over the same bf16 cache (keys and values
rounded once when written, widened to fp32 to attend): per-token logprobs agree to fp32 precision.
Against the fp32 cache the logprobs move, but only by bf16 rounding of K/V, and the greedy
tokens stay the same on these prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine
from loraserve.engine.memory_plan import kv_bytes_per_token
from loraserve.engine.params import SamplingParams
from loraserve.layers.precision import PrecisionError, resolve_precision
from tests.fixtures.engines import cpu_engine

PROMPTS = [
    [1, 17, 33, 90, 5, 61, 7],
    [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6],
    [1, 64, 128, 12, 99, 100, 101, 102, 103, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160],
]
NEW_TOKENS = 24  # past a 16-token block: the decode reads several blocks


def make_engine(path: Path, backend: str, **kw) -> Engine:
    return cpu_engine(path, backend, kv_cache_memory_bytes=16 << 20, prefix_caching=False, **kw)


def run(engine: Engine, adapters: list | None = None) -> tuple[list[list[int]], list[list[float]]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    results = engine.generate(PROMPTS, params, adapters)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
    return [[t.id for t in r.tokens] for r in results], [[t.logprob for t in r.tokens] for r in results]


def test_resolved_kv_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision(torch.float32, cpu).kv == torch.float32
    assert resolve_precision(torch.bfloat16, cpu).kv == torch.bfloat16  # auto: the serving dtype
    assert resolve_precision(torch.float32, cpu, "int8").kv == torch.bfloat16  # low-precision weights
    assert resolve_precision(torch.bfloat16, cuda, "int8").kv == torch.bfloat16  # CUDA: the compute dtype
    assert resolve_precision(torch.float32, cuda, "int8").kv == torch.float32
    assert resolve_precision(torch.float32, cpu, kv_cache_dtype="bfloat16").kv == torch.bfloat16
    assert resolve_precision(torch.bfloat16, cpu, kv_cache_dtype="float32").kv == torch.float32
    assert resolve_precision(torch.float16, cuda, kv_cache_dtype="auto").kv == torch.float16
    with pytest.raises(PrecisionError, match="--kv-cache-dtype"):
        resolve_precision(torch.float32, cpu, kv_cache_dtype="fp8")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_bf16_cache_matches_the_pytorch_path_and_stays_near_fp32(
    llama_dir: Path, llama_adapters: list[Path], quantize: str | None
) -> None:
    adapter = parse_peft_adapter(llama_adapters[3])
    adapters = [adapter, None, adapter]
    native = make_engine(llama_dir, "native", kv_cache_dtype="bfloat16", quantize=quantize)
    k_cache, v_cache = native.runner.kv_caches[0]
    assert k_cache.dtype == v_cache.dtype == torch.bfloat16
    assert native.runner.ops.decode_reads(torch.bfloat16)  # the kernel reads it, no fallback
    reference = make_engine(llama_dir, "torch", kv_cache_dtype="bfloat16", quantize=quantize)
    fp32_cache = make_engine(llama_dir, "native", quantize=quantize, kv_cache_dtype="float32")
    assert fp32_cache.runner.kv_caches[0][0].dtype == torch.float32
    ids, lps = run(native, adapters)
    ref_ids, ref_lps = run(reference, adapters)
    f_ids, f_lps = run(fp32_cache, adapters)
    assert ids == ref_ids == f_ids
    got, want, full = (torch.tensor(x) for x in (lps, ref_lps, f_lps))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    moved = float((got - full).abs().max())
    assert 0 < moved < 0.05, f"bf16 K/V moved the logprobs by {moved}"


def test_fp16_cache_runs_on_the_pytorch_path_of_the_native_backend(llama_dir: Path) -> None:
    """The decode kernel reads fp32 and bf16 only: an fp16 cache takes the gather + SDPA path."""
    native = make_engine(llama_dir, "native", kv_cache_dtype="float16")
    assert native.runner.kv_caches[0][0].dtype == torch.float16
    assert not native.runner.ops.decode_reads(torch.float16)
    ids, _ = run(native)
    ref_ids, _ = run(make_engine(llama_dir, "torch", kv_cache_dtype="float16"))
    assert ids == ref_ids


def test_a_16_bit_cache_holds_twice_the_tokens_in_the_same_bytes(llama_dir: Path) -> None:
    e32 = make_engine(llama_dir, "torch")
    e16 = make_engine(llama_dir, "torch", kv_cache_dtype="bfloat16")
    mc = e32.model_config
    assert kv_bytes_per_token(mc, torch.bfloat16) * 2 == kv_bytes_per_token(mc, torch.float32)
    # kv_cache_memory_bytes is a byte budget: the bf16 cache fits twice the blocks
    assert e16.stats()["total_blocks"] >= 2 * e32.stats()["total_blocks"] - 2
