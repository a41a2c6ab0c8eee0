"""Which dtype each kind of tensor is served in, decided once from `--dtype`, `--quantize` and
`--adapter-dtype`.

- **Weights** (every matrix: projections, lm_head, embedding) are held in the serving dtype,
  or as int8 with per-output-channel scales under `--quantize int8` (LoRAX's `bitsandbytes` and
  `eetq`, both 8-bit weight-only, mean the same here).
- **Compute** (activations, norms and biases, logits): on CPU, fp32 even when the
  weights are bf16 or int8. Why: CPU GEMMs at serving batch sizes are bound by reading the
  weights, not by arithmetic, so fp32 activations cost nothing measurable while keeping every
  existing fp32 kernel (attention, norms, LoRA, rotary) and their accuracy; CPUs without
  bf16 instructions (AVX2, most cloud VMs) would otherwise emulate bf16 arithmetic (PyTorch's
  bf16 path: 2.4 tok/s against 15.7 in fp32 on a 2-core AVX2 box). The exception is where
  arithmetic does bind: GEMMs of many rows (prefill, a full decode batch) of a `--dtype bfloat16`
  model, bf16 or int8 weights alike, round their activations to bf16 on CPUs with bf16 dot
  products (AVX512_BF16, AMX), as transformers in bf16 does (quantized_linear.py). On CUDA compute
  follows `--dtype`.
- **KV cache**: `--kv-cache-dtype`; `auto` is bf16 when CPU weights are low precision (bf16, as
  vLLM's `auto` and Hugging Face in bf16 keep it; int8, as llama.cpp keeps an F16 cache beside
  Q8_0 weights), else the compute dtype (fp32 serving keeps an fp32 cache, the oracle's). Why
  not simply the compute dtype: at 32 decode rows with ~250 tokens of context the cache a step
  reads is larger than the 135M model's weights, and on CPU attention then costs as much as the
  projections; a 16-bit cache halves those bytes (the CPU kernel widens bf16 in registers and
  keeps scores and sums fp32) and the cache's memory. New keys and values are rounded once, when
  written; a fresh prompt's own attention uses them unrounded, as vLLM's does.
- **Adapters** (the LoRA slot table): `--adapter-dtype`, by default the serving dtype. A bf16
  table computes its deltas in bf16 (x rounded to bf16, as PEFT in bf16 does) and adds them to
  the fp32 output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# LoRAX's --quantize values that mean 8-bit weight-only, and what else LoRAX accepts
INT8_NAMES = ("int8", "bitsandbytes", "eetq")
OTHER_LORAX_QUANTIZE = (
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "gptq",
    "awq",
    "fp8",
    "fp8-kv",
    "hqq-4bit",
    "hqq-3bit",
    "hqq-2bit",
)
# every dtype name a flag accepts (`--dtype`, `--kv-cache-dtype`)
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
ADAPTER_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
}


class PrecisionError(ValueError):
    """A flag asks for something that is not served; the message names the flag."""


def weight_quantization(quantize: str | None) -> str | None:
    """Returns "int8" for the 8-bit weight-only names, None for none; anything else refused at start."""
    if quantize is None or quantize.strip().lower() in ("", "none"):
        return None
    q = quantize.strip().lower()
    if q in INT8_NAMES:
        return "int8"
    what = "a LoRAX method loraserve does not implement" if q in OTHER_LORAX_QUANTIZE else "unknown"
    raise PrecisionError(
        f"--quantize {quantize} is not supported ({what}); supported: int8 (8-bit weight-only, per-channel; "
        f"LoRAX's {', '.join(INT8_NAMES[1:])} mean the same)"
    )


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype  # activations, norms, biases
    load: torch.dtype  # matrices are read (rounded) in this dtype before packing or quantising
    weights: str  # "plain" (in `load`), "bf16" (converted per use) or "int8"
    adapter: torch.dtype  # the LoRA slot table
    kv: torch.dtype = torch.float32  # the KV cache


def resolve_precision(
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None = None,
    adapter_dtype: str | None = None,
    kv_cache_dtype: str | None = None,
) -> Precision:
    """The served precision for `--dtype`, `--quantize`, `--adapter-dtype`, `--kv-cache-dtype`
    on `device`."""
    quant = weight_quantization(quantize)
    if adapter_dtype is not None and adapter_dtype not in ADAPTER_DTYPES:
        raise PrecisionError(f"--adapter-dtype {adapter_dtype} is not one of float32, bfloat16")
    adapter = ADAPTER_DTYPES[adapter_dtype] if adapter_dtype else dtype
    cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16
    compute = torch.float32 if cpu_bf16 else dtype
    if kv_cache_dtype in (None, "auto"):
        # low-precision weights on CPU (bf16 or int8): a bf16 cache, as llama.cpp's F16 one beside Q8_0
        kv = torch.bfloat16 if device.type == "cpu" and (cpu_bf16 or quant) else compute
    elif kv_cache_dtype in DTYPES:
        kv = DTYPES[kv_cache_dtype]
    else:
        raise PrecisionError(
            f"--kv-cache-dtype {kv_cache_dtype} is not one of auto, float32, bfloat16, float16"
        )
    return Precision(compute, dtype, quant or ("bf16" if cpu_bf16 else "plain"), adapter, kv)
