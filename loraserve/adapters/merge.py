"""Per-request adapter merging with LoRAX's semantics (`parameters.merged_adapters`).

A request that names several adapters must get the same answer here as on
LoRAX, so this follows LoRAX's `merges/strategies.py` literally rather than
PEFT's `add_weighted_adapter`:

* for each (layer, module) the `lora_A` tensors are merged on their own and the
  `lora_B` tensors on their own, with the strategy and the *raw* weights (PEFT's
  `add_weighted_adapter` instead square-roots the weights and folds each
  adapter's alpha/r into them);
* all adapters must share one rank; target modules are the union, and a module
  only some adapters have is merged from those adapters with their weights;
* the merged adapter keeps the *first* adapter's config: its alpha, r and
  rslora flag give the scale of every merged module, whatever the alphas of the
  others (LoRAX's `_merge_lora_configs` copies config 0, and its loader computes
  `lora_alpha / r` from that config; alpha/rank patterns are not consulted).

The building blocks are PEFT's `merge_utils` (LoRAX vendored them): magnitude
or random pruning, sign election on the pruned *unweighted* tensors, weights,
disjoint mean. One deliberate difference from LoRAX: its `random_pruning`
computes `pruned / density` and throws the result away, so LoRAX's DARE never
rescales; DARE as published (and PEFT today) rescales kept entries by
1/density, and that is what is done here.

DARE's random drop is seeded from the merge spec's cache key, the module and
the side, so one spec always yields the same weights, in any process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter, LoraModuleWeights

MERGE_STRATEGIES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS: tuple[str, ...] = ("total", "frequency")
# LoRAX refuses to merge its pseudo adapter that stands for "no adapter".
BASE_MODEL_ADAPTER_ID = "__base_model__"

_PRUNING_STRATEGIES = ("ties", "dare_linear", "dare_ties")
_SIGN_STRATEGIES = ("ties", "dare_ties")


class MergeError(AdapterError):
    """A merge request that cannot be honoured; LoRAX answers these with 422."""

    status_code = 422


@dataclass
class MergeSpec:
    """The `merged_adapters` object of a request, with LoRAX's defaults."""

    ids: list[str]
    weights: list[float]
    merge_strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    @classmethod
    def from_request(cls, obj: Mapping[str, Any]) -> MergeSpec:
        """Build from request JSON the way LoRAX's router reads it.

        `null` strategy/sign method mean linear/total; missing or empty weights
        mean 1.0 each (LoRAX's server does `torch.ones`); a missing density is
        1.0 here (LoRAX's router would use 0.0, which prunes everything away).
        """
        if not isinstance(obj, Mapping):
            raise MergeError("`merged_adapters` must be an object")
        ids = obj.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise MergeError("`ids` must be a list of strings")
        weights = obj.get("weights")
        if weights is None or weights == []:
            weights = [1.0] * len(ids)
        if not isinstance(weights, list) or not all(_is_number(w) for w in weights):
            raise MergeError("`weights` must be a list of numbers")
        density = obj.get("density")
        if density is None:
            density = 1.0
        if not _is_number(density):
            raise MergeError("`density` must be a number")
        spec = cls(
            ids=list(ids),
            weights=[float(w) for w in weights],
            merge_strategy=obj.get("merge_strategy") or "linear",
            density=float(density),
            majority_sign_method=obj.get("majority_sign_method") or "total",
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        """Raise `MergeError` (a `ValueError`) naming the first offending field."""
        if not self.ids:
            raise MergeError("`ids` cannot be empty")
        if any(not isinstance(i, str) or not i for i in self.ids):
            raise MergeError("`ids` must be non-empty strings")
        if not self.weights:
            raise MergeError("`weights` cannot be empty")
        if len(self.weights) != len(self.ids):
            raise MergeError(
                f"`ids` and `weights` must have the same length (got {len(self.ids)} ids "
                f"and {len(self.weights)} weights)"
            )
        if not all(_is_number(w) and math.isfinite(w) for w in self.weights):
            raise MergeError("`weights` must be finite numbers")
        if self.merge_strategy not in MERGE_STRATEGIES:
            raise MergeError(f"`merge_strategy` must be one of {list(MERGE_STRATEGIES)}")
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise MergeError(f"`majority_sign_method` must be one of {list(MAJORITY_SIGN_METHODS)}")
        if not _is_number(self.density) or not 0.0 <= self.density <= 1.0:
            raise MergeError("`density` must be >= 0.0 and <= 1.0")
        if self.merge_strategy in _PRUNING_STRATEGIES and self.density == 0.0:
            raise MergeError(f"`density` must be > 0.0 for merge_strategy {self.merge_strategy!r}")
        if len(self.ids) > 1 and BASE_MODEL_ADAPTER_ID in self.ids:
            raise MergeError(f"`ids`: the base model ({BASE_MODEL_ADAPTER_ID}) cannot be merged")

    @property
    def is_single(self) -> bool:
        """LoRAX serves a one-id spec as that plain adapter, ignoring weight and strategy."""
        return len(self.ids) == 1

    def cache_key(self, resolved_keys: Sequence[str]) -> str:
        """A stable name for the merged weights, also the seed of DARE's drop.

        `resolved_keys` are the fetched adapters' keys (source, id, resolved
        revision), so a new revision of one input is a new merge. Fields that
        cannot change the result (density for linear, the sign method for
        linear/dare_linear) are left out, so equivalent requests share a slot.
        Floats are hashed exactly (`float.hex`), never via a rounded repr.
        """
        if len(resolved_keys) != len(self.ids):
            raise ValueError("one resolved key per id is needed")
        doc: dict[str, Any] = {
            "ids": list(self.ids),
            "keys": list(resolved_keys),
            "weights": [float(w).hex() for w in self.weights],
            "strategy": self.merge_strategy,
        }
        if self.merge_strategy in _PRUNING_STRATEGIES:
            doc["density"] = float(self.density).hex()
        if self.merge_strategy in _SIGN_STRATEGIES:
            doc["sign"] = self.majority_sign_method
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return f"merged:{digest}"


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- PEFT/LoRAX building blocks (task tensors stacked on dim 0) -------------


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `int(density * numel)` entries by magnitude (PEFT's exact top-k call)."""
    if density >= 1.0:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top_k = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` and rescale kept ones by 1/density.

    The mask is drawn on the CPU from a seeded generator so it is the same on
    every device and in every process.
    """
    if density >= 1.0:
        return t
    keep = torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return (t * keep.to(t.device, t.dtype)) / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    sign = stacked.sign()
    if method == "total":
        sign_magnitude = stacked.sum(dim=0)
    else:  # frequency
        sign_magnitude = sign.sum(dim=0)
    majority = torch.where(sign_magnitude >= 0, 1, -1)
    return sign == majority


def _disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tensors that agree with the elected sign (a zero counts where its sign is elected)."""
    mixed = (weighted * mask).sum(dim=0)
    preserved = mask.sum(dim=0)
    return mixed / torch.clamp(preserved, min=1.0)


def _apply_weights(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    spec: MergeSpec,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Merge the same-shaped task tensors of one side (A or B) of one module.

    `generators` (one per tensor) are only used by the DARE strategies.
    """
    strategy = spec.merge_strategy
    if strategy in ("dare_linear", "dare_ties"):
        if generators is None or len(generators) != len(tensors):
            raise ValueError("DARE needs one seeded generator per tensor")
        tensors = [_random_prune(t, spec.density, g) for t, g in zip(tensors, generators, strict=True)]
    elif strategy == "ties":
        tensors = [_magnitude_prune(t, spec.density) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    if strategy in _SIGN_STRATEGIES:
        mask = _majority_sign_mask(stacked, spec.majority_sign_method)  # elected before weighting
        return _disjoint_merge(_apply_weights(stacked, weights), mask)
    return _apply_weights(stacked, weights).sum(dim=0)


def dare_generator(key: str, layer: int, module: str, side: str, index: int) -> torch.Generator:
    """A CPU generator seeded from the merge key and the tensor's place in the merge.

    The adapter's position (not its id) is part of the seed, so listing one
    adapter twice gives two independent drops, as LoRAX's unseeded draws do.
    """
    material = f"{key}|{layer}|{module}|{side}|{index}".encode()
    seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(seed)


# ---- whole adapters ----------------------------------------------------------


def first_config_scale(adapter: LoraAdapter) -> float:
    """LoRAX's `get_scaling_factor(lora_alpha, r, use_rslora)` on the config level."""
    if adapter.use_rslora:
        return adapter.alpha / math.sqrt(adapter.rank)
    return adapter.alpha / adapter.rank


def merge_adapters(adapters: Sequence[LoraAdapter], spec: MergeSpec, key: str) -> LoraAdapter:
    """Merge fetched adapters (in `spec.ids` order) into one adapter named `key`.

    Pure tensor work on whatever device the inputs live on; callers run it off
    the event loop. A one-adapter spec returns that adapter untouched (LoRAX
    loads it as a plain adapter).
    """
    spec.validate()
    if len(adapters) != len(spec.ids):
        raise ValueError(f"expected {len(spec.ids)} adapters for the merge, got {len(adapters)}")
    if spec.is_single:
        return adapters[0]
    ranks = [a.rank for a in adapters]
    if len(set(ranks)) > 1:
        raise MergeError(
            f"unable to merge adapters with different ranks: {', '.join(f'{i}: r={r}' for i, r in zip(spec.ids, ranks, strict=True))}"
        )
    first = adapters[0]
    scale = first_config_scale(first)
    weights = torch.tensor(spec.weights, dtype=torch.float32)
    slots = sorted({slot for a in adapters for slot in a.modules})  # (layer, name): same order every run
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for layer, module in slots:
        idx = [i for i, a in enumerate(adapters) if (layer, module) in a.modules]
        parts = [adapters[i].modules[(layer, module)] for i in idx]
        _check_same_shapes(parts, [spec.ids[i] for i in idx], layer, module)
        w = weights[idx].to(parts[0].a.device)
        merged: dict[str, torch.Tensor] = {}
        for side in ("a", "b"):
            tensors = [getattr(p, side) for p in parts]
            gens = None
            if spec.merge_strategy.startswith("dare"):
                gens = [dare_generator(key, layer, module, side, i) for i in idx]
            merged[side] = merge_tensors(tensors, w, spec, gens).contiguous()
        modules[(layer, module)] = LoraModuleWeights(a=merged["a"], b=merged["b"], scale=scale)
    targets = tuple(sorted({mod for _, mod in modules}))
    return LoraAdapter(
        key=key,
        rank=first.rank,
        alpha=first.alpha,
        use_rslora=first.use_rslora,
        target_modules=targets,
        modules=modules,
        base_model_name=first.base_model_name,
        config=_merged_config(first, targets),
    )


def _check_same_shapes(parts: list[LoraModuleWeights], ids: list[str], layer: int, module: str) -> None:
    if len({tuple(p.a.shape) for p in parts}) > 1 or len({tuple(p.b.shape) for p in parts}) > 1:
        desc = ", ".join(f"{i}: r={p.rank}" for i, p in zip(ids, parts, strict=True))
        raise MergeError(f"unable to merge adapters at layer {layer} {module}: shapes differ ({desc})")


def _merged_config(first: LoraAdapter, targets: tuple[str, ...]) -> dict:
    """The first adapter's config with the union of targets; patterns dropped since every module uses its scale."""
    cfg = copy.deepcopy(first.config)
    cfg["target_modules"] = list(targets)
    cfg["r"] = first.rank
    cfg["lora_alpha"] = first.alpha
    cfg["use_rslora"] = first.use_rslora
    cfg["rank_pattern"] = {}
    cfg["alpha_pattern"] = {}
    return cfg


__all__ = [
    "MAJORITY_SIGN_METHODS",
    "MERGE_STRATEGIES",
    "MergeError",
    "MergeSpec",
    "dare_generator",
    "first_config_scale",
    "merge_adapters",
    "merge_tensors",
]
