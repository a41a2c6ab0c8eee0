"""How an architecture declares its projections, once, and what is derived from that.

Each model family lists its decoder layer's linear projections as
`Projection`s: the HF module name (what a PEFT adapter targets), the module's
path in the layer (where its checkpoint tensor lives), its shape, and the
runtime matmul (`fused`) it is computed in. Projections of one fused matmul
read the same input and are stored side by side in it (q/k/v, gate/up), so
one GEMM and one LoRA A-side matmul serve all of them; a checkpoint that
already fuses them (Phi-3's `qkv_proj`) declares one projection per matmul.

Everything that needs to know projection names derives from this list: the
LoRA slot table's shapes and groups, adapter validation (`ModelConfig.
linear_shapes`), the fused weights the model builds, and the slices of a fused
output that each LoRA delta is added to.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Projection:
    name: str  # HF module name, the PEFT target: "q_proj", Phi-3's "qkv_proj"
    path: str  # module path inside a decoder layer: "self_attn.q_proj"
    in_features: int
    out_features: int
    fused: str  # the runtime matmul it lives in: "qkv", "o", "gate_up", "down"


def fused_groups(projections: list[Projection]) -> dict[str, tuple[Projection, ...]]:
    """Projections per runtime matmul, in declaration order (= column order of its output)."""
    groups: dict[str, list[Projection]] = {}
    for p in projections:
        groups.setdefault(p.fused, []).append(p)
    for name, members in groups.items():
        if len({p.in_features for p in members}) != 1:
            raise ValueError(f"fused projection {name!r} mixes input sizes")
    return {name: tuple(members) for name, members in groups.items()}


def linear_shapes(projections: list[Projection]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per LoRA-targetable module name."""
    return {p.name: (p.in_features, p.out_features) for p in projections}


def lora_groups(projections: list[Projection]) -> dict[str, tuple[str, ...]]:
    """Module names that share one LoRA A-side matmul (they read the same input)."""
    return {g: tuple(p.name for p in members) for g, members in fused_groups(projections).items()}
