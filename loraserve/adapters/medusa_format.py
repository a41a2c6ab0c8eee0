"""Parse Medusa speculative heads, alone or shipped beside a PEFT LoRA, into host tensors.

Layout (the Medusa project's, as LoRAX reads it):

* `config.json`: `medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`,
  optional `version` (default 1, as in LoRAX; `2` marks heads that reuse the
  base model's `lm_head`, the only kind LoRAX accepts per request).
* `medusa_lm_head.safetensors` (older checkpoints: `medusa_lm_head.pt`, read
  with `torch.load(weights_only=True)` so a pickle can never run code).
  Head `i`, residual block `j < medusa_num_layers`: `{i}.{j}.linear.weight`
  `[H, H]` and `{i}.{j}.linear.bias` `[H]`; v1 heads add their own vocabulary
  projection `{i}.{medusa_num_layers}.weight` `[V, H]`.

Which projection a head uses is decided by the tensors, as LoRAX does: heads
with `{i}.{L}.weight` use it, heads without reuse the base `lm_head` (all heads
must agree). Files holding more heads than the config names are accepted and
the extra heads dropped, because published checkpoints exist whose config was
trimmed after training (e.g. FasterDecoding's vicuna heads).

A directory with `adapter_config.json` + LoRA weights *and* the Medusa files is
a LoRA fine-tune with its own heads; `parse_adapter_dir` returns one
`LoraAdapter` carrying both parts (`adapter.medusa`).

The `MedusaHeads` type lives in `lora_weights` with the other adapter types, so
the engine and layers can hold heads without importing a parser; it is
importable from here too.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter, MedusaHeads
from loraserve.adapters.peft_format import is_lora_dir, load_tensor_file, parse_peft_adapter

log = logging.getLogger(__name__)

MEDUSA_CONFIG_FILE = "config.json"
MEDUSA_SAFETENSORS_FILE = "medusa_lm_head.safetensors"
MEDUSA_PT_FILE = "medusa_lm_head.pt"
MEDUSA_FILES: tuple[str, ...] = (MEDUSA_CONFIG_FILE, MEDUSA_SAFETENSORS_FILE, MEDUSA_PT_FILE)
MAX_HEADS = 64  # far above any useful speculation depth; guards against absurd configs
MAX_LAYERS = 16

# "3.0.linear.weight", "3.1.weight"; the Medusa model's own state dict may carry "medusa_head."
_KEY_RE = re.compile(r"^(?:medusa_head\.)?(\d+)\.(\d+)\.(linear\.)?(weight|bias)$")


# ---- files ------------------------------------------------------------------------------------


def has_medusa_files(path: Path) -> bool:
    return (path / MEDUSA_CONFIG_FILE).is_file() and (
        (path / MEDUSA_SAFETENSORS_FILE).is_file() or (path / MEDUSA_PT_FILE).is_file()
    )


def is_adapter_dir(path: str | Path) -> bool:
    """A directory the server can serve: PEFT LoRA, Medusa heads, or both."""
    path = Path(path)
    return is_lora_dir(path) or has_medusa_files(path)


def read_medusa_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / MEDUSA_CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"Medusa adapter has no {MEDUSA_CONFIG_FILE}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{MEDUSA_CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{MEDUSA_CONFIG_FILE} must hold a JSON object")
    return cfg


def _int_field(cfg: dict, name: str, low: int, high: int) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AdapterError(
            f"{MEDUSA_CONFIG_FILE}: {name} must be an integer in [{low}, {high}], got {value!r}"
        )
    return value


def check_medusa_config(cfg: dict) -> tuple[int, int, int]:
    """(num_heads, num_layers, version) of a Medusa `config.json`."""
    if "medusa_num_heads" not in cfg:
        raise AdapterError(f"{MEDUSA_CONFIG_FILE} has no medusa_num_heads: it is not a Medusa adapter config")
    heads = _int_field(cfg, "medusa_num_heads", 1, MAX_HEADS)
    layers = _int_field(
        {"medusa_num_layers": cfg.get("medusa_num_layers", 1)}, "medusa_num_layers", 0, MAX_LAYERS
    )
    version = cfg.get("version", 1)
    # LoRAX reads it as float(...); accept 2 and 2.0 alike but nothing fractional or textual.
    if (
        isinstance(version, bool)
        or not isinstance(version, int | float)
        or not math.isfinite(version)
        or version != int(version)
        or version < 1
    ):
        raise AdapterError(f"{MEDUSA_CONFIG_FILE}: version must be a whole number >= 1, got {version!r}")
    return heads, layers, int(version)


def load_medusa_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """medusa_lm_head.safetensors, else the older medusa_lm_head.pt (read without running code)."""
    sd = load_tensor_file(path, MEDUSA_SAFETENSORS_FILE, MEDUSA_PT_FILE)
    if sd is not None:
        return sd
    raise AdapterError(f"Medusa adapter has neither {MEDUSA_SAFETENSORS_FILE} nor {MEDUSA_PT_FILE}")


# ---- tensors ----------------------------------------------------------------------------------


def _collect(
    sd: dict[str, torch.Tensor], num_heads: int, num_layers: int
) -> tuple[dict[tuple[int, int, str], torch.Tensor], dict[int, torch.Tensor], set[int]]:
    """Sort tensor names into block weights/biases and projections; reject anything else."""
    blocks: dict[tuple[int, int, str], torch.Tensor] = {}
    projs: dict[int, torch.Tensor] = {}
    extra_heads: set[int] = set()
    for name, tensor in sd.items():
        m = _KEY_RE.match(name)
        if m is None:
            raise AdapterError(
                f"unexpected tensor {name!r} in Medusa weights (expected '<head>.<layer>.linear.weight')"
            )
        head, layer, linear, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if head >= num_heads:
            extra_heads.add(head)
            continue
        if layer < num_layers and linear:
            blocks[(head, layer, kind)] = tensor
        elif layer == num_layers and not linear and kind == "weight":
            projs[head] = tensor
        else:
            raise AdapterError(
                f"unexpected tensor {name!r} in Medusa weights for medusa_num_layers={num_layers} "
                f"(blocks are '<head>.<0..{num_layers - 1}>.linear.weight|bias', "
                f"a head's own projection is '<head>.{num_layers}.weight')"
            )
    return blocks, projs, extra_heads


def _stack_blocks(
    blocks: dict[tuple[int, int, str], torch.Tensor], num_heads: int, num_layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden: int | None = None
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor] = []
    for head in range(num_heads):
        for layer in range(num_layers):
            where = f"Medusa head {head} block {layer}"
            w, b = blocks.get((head, layer, "weight")), blocks.get((head, layer, "bias"))
            if w is None or b is None:
                missing = f"{head}.{layer}.linear.{'weight' if w is None else 'bias'}"
                raise AdapterError(
                    f"Medusa weights lack {missing!r}: config.json names {num_heads} heads of "
                    f"{num_layers} blocks, the file holds fewer"
                )
            if w.dim() != 2 or w.shape[0] != w.shape[1]:
                raise AdapterError(
                    f"{where}: linear.weight must be square [hidden, hidden], got {tuple(w.shape)}"
                )
            hidden = hidden or int(w.shape[0])
            if w.shape[0] != hidden or tuple(b.shape) != (hidden,):
                raise AdapterError(
                    f"{where}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match hidden size {hidden}"
                )
            weights.append(w.float())
            biases.append(b.float())
    assert hidden is not None
    weight = torch.stack(weights).view(num_heads, num_layers, hidden, hidden).contiguous()
    bias = torch.stack(biases).view(num_heads, num_layers, hidden).contiguous()
    return weight, bias


def _stack_projections(
    projs: dict[int, torch.Tensor], num_heads: int, hidden: int | None
) -> torch.Tensor | None:
    if not projs:
        return None
    if len(projs) != num_heads:
        have = ", ".join(str(h) for h in sorted(projs))
        raise AdapterError(
            f"only some Medusa heads ({have}) carry their own vocabulary projection; all {num_heads} "
            "must (v1) or none (v2, reusing the base model's lm_head)"
        )
    shapes = {tuple(t.shape) for t in projs.values()}
    shape = next(iter(shapes))
    if len(shapes) != 1 or len(shape) != 2 or (hidden is not None and shape[1] != hidden):
        raise AdapterError(
            f"Medusa vocabulary projections must all be [vocab, {hidden or 'hidden'}], got {sorted(shapes)}"
        )
    return torch.stack([projs[h].float() for h in range(num_heads)]).contiguous()


def medusa_heads_from_state_dict(sd: dict[str, torch.Tensor], cfg: dict, key: str) -> MedusaHeads:
    num_heads, num_layers, version = check_medusa_config(cfg)
    blocks, projs, extra = _collect(sd, num_heads, num_layers)
    if extra:
        log.warning(
            "Medusa adapter %s: weights hold %d heads beyond the %d that config.json names; using the first %d",
            key,
            len(extra),
            num_heads,
            num_heads,
        )
    if num_layers == 0:
        if not projs:
            raise AdapterError(
                "medusa_num_layers=0 without per-head projections: the heads would repeat the base logits"
            )
        proj = _stack_projections(projs, num_heads, None)
        assert proj is not None
        hidden = int(proj.shape[-1])
        weight, bias = torch.zeros(num_heads, 0, hidden, hidden), torch.zeros(num_heads, 0, hidden)
    else:
        weight, bias = _stack_blocks(blocks, num_heads, num_layers)
        proj = _stack_projections(projs, num_heads, int(weight.shape[-1]))
    return MedusaHeads(
        key=key,
        num_heads=num_heads,
        num_layers=num_layers,
        version=version,
        weight=weight,
        bias=bias,
        proj=proj,
        base_model_name=cfg.get("base_model_name_or_path"),
        config=cfg,
    )


def parse_medusa_heads(path: str | Path, key: str | None = None) -> MedusaHeads:
    """Read a Medusa directory; checks against the base model happen in `validation.validate_medusa`."""
    path = Path(path)
    cfg = read_medusa_config(path)
    check_medusa_config(cfg)  # a bad config is reported before any weights are read
    return medusa_heads_from_state_dict(load_medusa_state_dict(path), cfg, key or str(path.resolve()))


def parse_adapter_dir(path: str | Path, key: str | None = None) -> LoraAdapter:
    """LoRA, Medusa, or LoRA + Medusa from one directory, as one `LoraAdapter`.

    A Medusa-only adapter comes back with no LoRA modules (rank 0) and `medusa`
    set, so every cache and registry that holds adapters holds these too.
    """
    path = Path(path)
    key = key or str(path.resolve())
    lora = is_lora_dir(path)
    medusa = has_medusa_files(path)
    if not lora and not medusa:
        raise AdapterError(
            "adapter directory holds neither a PEFT LoRA (adapter_config.json + adapter_model.safetensors/.bin) "
            "nor Medusa heads (config.json + medusa_lm_head.safetensors/.pt)"
        )
    heads = parse_medusa_heads(path, key) if medusa else None
    if lora:
        adapter = parse_peft_adapter(path, key)
        adapter.medusa = heads
        return adapter
    assert heads is not None
    return LoraAdapter(
        key=key,
        rank=0,
        alpha=0.0,
        use_rslora=False,
        target_modules=(),
        modules={},
        base_model_name=heads.base_model_name,
        config=heads.config,
        medusa=heads,
    )
