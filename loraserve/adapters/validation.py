"""Check that a parsed adapter fits the served base model before it reaches the engine.

Every fit check lives here, so the adapter store (for every source, the CLI's
local-only store included) and any other caller refuse exactly the same
adapters with the same messages; the engine only checks ranks against its
slot table.

`validate_adapter(adapter, cfg, max_rank=None) -> list[str]` raises
`AdapterError` (HTTP 400) with the reason when the adapter cannot work on
this model: a target module the model lacks, a layer index past the last
layer, A/B shapes that do not match the projection, non-finite weights, or a
rank that is absurd (larger than the projection itself, or above the
server's `max_rank`). It returns warnings for things that are suspicious but
harmless, such as `base_model_name_or_path` naming another model while all
shapes fit (fine-tunes of renamed or re-uploaded checkpoints are common).
Medusa heads shipped with the adapter are checked too (`validate_medusa`).

The parsers accept any module name, so this is the one place that knows which
modules exist: the model's own `ModelConfig.linear_shapes()`. New
architectures then need no change to the adapter formats.
"""

from __future__ import annotations

from pathlib import PurePath

import torch

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter, MedusaHeads
from loraserve.models.config import ModelConfig


def _model_name(name: str) -> str:
    """Compare model names by their last component: `/models/Llama-3` and `meta/llama-3` are one model."""
    return PurePath(name.rstrip("/")).name.lower()


def _check_config_targets(adapter: LoraAdapter, known: dict[str, tuple[int, int]]) -> None:
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):  # a regex string or "all-linear" cannot be checked by name
        missing = [t for t in targets if not isinstance(t, str) or t.split(".")[-1] not in known]
        if missing:
            raise AdapterError(
                f"adapter targets modules this model does not have: {', '.join(sorted(map(str, missing)))} "
                f"(model has {', '.join(known)})"
            )


def validate_adapter(adapter: LoraAdapter, cfg: ModelConfig, max_rank: int | None = None) -> list[str]:
    if adapter.medusa is not None:
        validate_medusa(adapter.medusa, cfg)
    shapes = cfg.linear_shapes()
    _check_config_targets(adapter, shapes)
    for (layer, module), w in adapter.modules.items():
        where = f"layer {layer} {module}"
        if module not in shapes:
            raise AdapterError(
                f"adapter has weights for module {module!r} (layer {layer}), which this model does not "
                f"have; the model's LoRA-targetable modules are {', '.join(shapes)}"
            )
        if not 0 <= layer < cfg.num_hidden_layers:
            raise AdapterError(
                f"adapter has weights for layer {layer} but the model has {cfg.num_hidden_layers} layers"
            )
        in_f, out_f = shapes[module]
        r = w.rank
        if tuple(w.a.shape) != (r, in_f) or tuple(w.b.shape) != (out_f, r):
            raise AdapterError(
                f"{where}: lora_A {tuple(w.a.shape)} / lora_B {tuple(w.b.shape)} do not fit the model's "
                f"projection ({in_f} -> {out_f}); expected lora_A ({r}, {in_f}) and lora_B ({out_f}, {r}). "
                f"The adapter was trained for a different base model"
            )
        if r > min(in_f, out_f):
            raise AdapterError(f"{where}: rank {r} exceeds the projection's own size ({in_f} -> {out_f})")
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{where}: rank {r} exceeds this server's maximum LoRA rank {max_rank}")
        if not (torch.isfinite(w.a).all() and torch.isfinite(w.b).all()):
            raise AdapterError(f"{where}: adapter weights contain NaN or infinity")
    warnings: list[str] = []
    base = adapter.base_model_name
    if base and cfg.name_or_path and _model_name(base) != _model_name(cfg.name_or_path):
        warnings.append(
            f"adapter was trained on {base!r} but the server runs {cfg.name_or_path!r}; "
            "shapes fit, so it is served anyway"
        )
    return warnings


def validate_medusa(heads: MedusaHeads, cfg: ModelConfig) -> None:
    """Raise `AdapterError` when the heads cannot run on this model.

    A `base_model_name_or_path` naming another model is not checked here: the
    adapter carries the same name, so `validate_adapter` already warns once.
    """
    if heads.hidden_size != cfg.hidden_size:
        raise AdapterError(
            f"Medusa heads have hidden size {heads.hidden_size} but the model's is {cfg.hidden_size}: "
            "the heads were trained for a different base model"
        )
    if heads.proj is not None and tuple(heads.proj.shape[1:]) != (cfg.vocab_size, cfg.hidden_size):
        raise AdapterError(
            f"Medusa heads project to a vocabulary of {heads.proj.shape[1]} tokens but the model has "
            f"{cfg.vocab_size}: the heads were trained for a different base model"
        )
    tensors = [heads.weight, heads.bias] + ([heads.proj] if heads.proj is not None else [])
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise AdapterError("Medusa weights contain NaN or infinity")
