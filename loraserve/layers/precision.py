"""Which dtype each kind of tensor is served in, decided once from `--dtype`, `--quantize` and
`--adapter-dtype`.

- **Weights** (every matrix: projections, lm_head, embedding) are held in the serving dtype,
  or as int8 with per-output-channel scales under `--quantize int8` (LoRAX's `bitsandbytes` and
  `eetq`, both 8-bit weight-only, mean the same here).
- **Compute** (activations, norms and biases, the KV cache, logits): on CPU, fp32 even when the
  weights are bf16 or int8. Why: CPU GEMMs at serving batch sizes are bound by reading the
  weights, not by arithmetic, so fp32 activations cost nothing measurable while keeping every
  existing fp32 kernel (attention, norms, LoRA, rotary) and their accuracy; CPUs without
  bf16 instructions (AVX2, most cloud VMs) would otherwise emulate bf16 arithmetic (PyTorch's
  bf16 path: 2.4 tok/s against 15.7 in fp32 on a 2-core AVX2 box). The KV cache follows the
  activations (fp32): the decode attention kernel reads fp32, and for the small models served
  on CPU the cache is sized by `--max-batch-total-tokens`, not bounded by its element size.
  On CUDA compute follows `--dtype`, as before.
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
    compute: torch.dtype  # activations, norms, biases, KV cache
    load: torch.dtype  # matrices are read (rounded) in this dtype before packing or quantising
    weights: str  # "plain" (in `load`), "bf16" (converted per use) or "int8"
    adapter: torch.dtype  # the LoRA slot table

    def to_compute(
        self, weights: tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Vectors (norms, biases) in the compute dtype; matrices stay as loaded for packing.
        Loaded in `load` first, so a bf16 model's norms are the bf16 values, exactly."""
        if self.compute == self.load:
            return weights
        per_layer, top = weights

        def conv(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(self.compute) if v.dim() < 2 else v for k, v in d.items()}

        return [conv(d) for d in per_layer], conv(top)


def resolve_precision(
    dtype: torch.dtype, device: torch.device, quantize: str | None = None, adapter_dtype: str | None = None
) -> Precision:
    """The served precision for `--dtype`, `--quantize`, `--adapter-dtype` on `device`."""
    quant = weight_quantization(quantize)
    if adapter_dtype is not None and adapter_dtype not in ADAPTER_DTYPES:
        raise PrecisionError(f"--adapter-dtype {adapter_dtype} is not one of float32, bfloat16")
    adapter = ADAPTER_DTYPES[adapter_dtype] if adapter_dtype else dtype
    if device.type == "cpu" and dtype == torch.bfloat16:
        return Precision(torch.float32, torch.bfloat16, quant or "bf16", adapter)
    return Precision(dtype, dtype, quant or "plain", adapter)
