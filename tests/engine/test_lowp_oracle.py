"""`--dtype bfloat16` against transformers in bf16, `--quantize int8` against our own fp32 run of
the dequantised weights, on tiny random models, through both CPU backends (native kernels and
PyTorch), with and without LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.params import SamplingParams
from loraserve.layers.precision import PrecisionError, resolve_precision, weight_quantization
from loraserve.layers.quantized_linear import AMX_MIN_ROWS, quantize_int8
from tests.fixtures.engines import cpu_engine
from tests.fixtures.tiny_models import hf_greedy, load_hf_model

PROMPTS = [
    [1, 17, 33, 90, 5, 61, 7],
    [1, 200, 3, 44],
    [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6],
    [1, 64, 128, 12, 99, 100, 101, 102, 103, 150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 40, 41],
]
NEW_TOKENS = 12
BACKENDS = ["native", "torch"]


def bf16_tolerance(ref: torch.Tensor) -> float:
    """bf16 keeps 8 bits: transformers rounds every activation to it, we only the weights."""
    return 0.03 * float(ref.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied (embedding read from the lm_head)
def test_bf16_matches_transformers_in_bf16(tiny_model_dirs: dict[str, Path], arch: str, backend: str) -> None:
    path = tiny_model_dirs[arch]
    hf = load_hf_model(path).to(torch.bfloat16)
    engine = cpu_engine(path, backend, dtype="bfloat16")
    assert engine.runner.precision.weights == "bf16" and engine.runner.dtype == torch.float32
    for ids in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = engine.prompt_logits(ids)
        torch.testing.assert_close(ours, ref, atol=bf16_tolerance(ref), rtol=0)
    results = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True))
    for ids, res in zip(PROMPTS, results):
        assert [t.id for t in res.tokens] == hf_greedy(hf, ids, NEW_TOKENS)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adapter_dtype", [None, "float32"])  # default: the serving dtype (bf16)
def test_bf16_with_lora_matches_peft_in_bf16(
    llama_dir: Path, llama_adapters: list[Path], backend: str, adapter_dtype: str | None
) -> None:
    from peft import PeftModel

    engine = cpu_engine(llama_dir, backend, dtype="bfloat16", adapter_dtype=adapter_dtype)
    assert engine.runner.lora.dtype == (torch.float32 if adapter_dtype else torch.bfloat16)
    # the native backend runs both table dtypes through its own LoRA kernel (the row layout)
    assert (engine.runner.ops.lora_batch([(0, 1, 0)]).rows is not None) == (backend == "native")
    chosen = [llama_adapters[1], llama_adapters[3]]  # attention-only, and all seven rsLoRA
    adapters = [parse_peft_adapter(p) for p in chosen]
    rows = [(PROMPTS[i], adapters[i % 2], chosen[i % 2]) for i in range(3)] + [(PROMPTS[3], None, None)]
    results = engine.generate(
        [r[0] for r in rows],
        SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True),
        [r[1] for r in rows],
    )
    base = load_hf_model(llama_dir).to(torch.bfloat16)
    for (ids, adapter, adir), res in zip(rows, results):
        ref_model = (
            base
            if adir is None
            else PeftModel.from_pretrained(load_hf_model(llama_dir), adir).to(torch.bfloat16)
        )
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(engine.prompt_logits(ids, adapter), ref, atol=bf16_tolerance(ref), rtol=0)
        assert [t.id for t in res.tokens] == hf_greedy(ref_model, ids, NEW_TOKENS), f"adapter {adir}"
    assert engine.stats()["adapter_slots_in_use"] == 0


def dequantised_checkpoint(src: Path, dst: Path) -> Path:
    """`src` with every matrix the engine quantises (projections, lm_head, or a tied embedding)
    replaced by its int8 dequantisation: what `--quantize int8` must compute, run in fp32."""
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    tied = json.loads((src / "config.json").read_text()).get("tie_word_embeddings", False)
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if t.dim() == 2 and (
            name != "model.embed_tokens.weight" or (tied and "lm_head.weight" not in tensors)
        ):
            q, scale = quantize_int8(t)
            tensors[name] = (q.float() * scale[:, None]).to(t.dtype)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_computes_exactly_the_dequantised_model(
    tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, arch: str, backend: str
) -> None:
    path = tiny_model_dirs[arch]
    oracle = cpu_engine(dequantised_checkpoint(path, tmp_path_factory.getbasetemp() / f"deq-{arch}"), "torch")
    # the oracle runs an fp32 cache (int8's default is bf16: tests/engine/test_kv_cache_dtype.py)
    engine = cpu_engine(path, backend, quantize="int8", kv_cache_dtype="float32")
    assert engine.runner.precision.weights == "int8"
    fp32 = cpu_engine(path, "torch")
    for ids in PROMPTS:
        ref = oracle.prompt_logits(ids)
        ours = engine.prompt_logits(ids)
        assert float((ours - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
        # ... while the quantisation itself moved the logits by far more than that
        assert float((fp32.prompt_logits(ids) - ref).abs().max()) > 2e-3 * float(ref.abs().max())
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    got = [[t.id for t in r.tokens] for r in engine.generate(PROMPTS, params)]
    assert got == [[t.id for t in r.tokens] for r in oracle.generate(PROMPTS, params)]


def test_int8_with_lora_adds_the_fp32_delta(
    llama_dir: Path, llama_adapters: list[Path], tmp_path: Path
) -> None:
    """LoRA deltas stay in the adapter dtype (fp32 here) on top of the int8 base: the same as the
    dequantised model with the same adapter."""
    oracle = cpu_engine(dequantised_checkpoint(llama_dir, tmp_path / "deq"), "torch")
    engine = cpu_engine(llama_dir, "native", quantize="bitsandbytes")  # LoRAX's name for 8-bit
    adapter = parse_peft_adapter(llama_adapters[3])
    for ids in PROMPTS[:2]:
        ref = oracle.prompt_logits(ids, adapter)
        assert float((engine.prompt_logits(ids, adapter) - ref).abs().max()) <= 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_of_a_bf16_model_rounds_only_the_activations_of_many_row_gemms(
    tiny_model_dirs: dict[str, Path], arch: str
) -> None:
    """`--dtype bfloat16 --quantize int8`: the same int8 weights as PyTorch's run of that model
    (fp32 activations); a prompt of AMX_MIN_ROWS tokens or more multiplies bf16-rounded
    activations where the CPU has bf16 dot products (within bf16 tolerance), a shorter one and
    every decode step of a few rows keep fp32 ones (within the int8 oracle's 1e-3)."""
    path = tiny_model_dirs[arch]
    oracle = cpu_engine(path, "torch", dtype="bfloat16", quantize="int8")
    engine = cpu_engine(path, "native", dtype="bfloat16", quantize="int8")
    assert engine.runner.ops.bf16_activations and engine.runner.precision.weights == "int8"
    isa = engine.runner.ops.kernels.lowp_gemm_isa()
    for ids in PROMPTS:
        ref = oracle.prompt_logits(ids)
        err = float((engine.prompt_logits(ids) - ref).abs().max()) / float(ref.abs().max())
        if len(ids) < AMX_MIN_ROWS or not ("bf16dp" in isa or "amx" in isa):
            assert err <= 1e-3
        else:
            assert 1e-5 < err <= 0.03, "bf16 activations: rounded, and only that much"
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    got = [[t.id for t in r.tokens] for r in engine.generate(PROMPTS, params)]
    assert got == [[t.id for t in r.tokens] for r in oracle.generate(PROMPTS, params)]


def test_quantize_names() -> None:
    names = ("int8", "bitsandbytes", "EETQ", None, "")
    assert [weight_quantization(q) for q in names] == ["int8", "int8", "int8", None, None]
    for bad in ("gptq", "awq", "fp8", "bitsandbytes-nf4", "int4"):
        with pytest.raises(PrecisionError, match=f"--quantize {bad}"):
            weight_quantization(bad)
    with pytest.raises(PrecisionError, match="--adapter-dtype"):
        resolve_precision(torch.float32, torch.device("cpu"), adapter_dtype="float16")
    cpu = resolve_precision(torch.bfloat16, torch.device("cpu"))
    assert (cpu.compute, cpu.weights, cpu.adapter) == (torch.float32, "bf16", torch.bfloat16)
    cuda = resolve_precision(torch.bfloat16, torch.device("cuda"), "eetq", "float32")
    assert (cuda.compute, cuda.weights, cuda.adapter) == (torch.bfloat16, "int8", torch.float32)
