"""Parse a PEFT LoRA checkpoint directory into a `LoraAdapter`.

Only the files are trusted, never code: `.bin` checkpoints are read with
`torch.load(weights_only=True)`, which refuses pickles that would run code.

Tensor names are read generically (`...layers.<i>.<module path>.lora_A|lora_B
[.<adapter name>].weight`), so no architecture's projection list is built in
here: a module is named by the last component of its path (`q_proj`,
`qkv_proj`, `gate_up_proj`, ...). Whether the served model has that module is
decided by `validation.validate_adapter` against the model's own list.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraserve.adapters.errors import AdapterError
from loraserve.adapters.lora_weights import LoraAdapter, LoraModuleWeights

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (adapter name optional):
# group 1 the layer, group 2 the module path inside the layer, group 3 the side.
_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.((?:\w+\.)*?\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def is_lora_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (
        (path / SAFETENSORS_FILE).is_file() or (path / BIN_FILE).is_file()
    )


def read_adapter_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"adapter has no {CONFIG_FILE}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {e}") from e


def load_tensor_file(path: Path, safetensors_name: str, pickle_name: str) -> dict[str, torch.Tensor] | None:
    """Read `safetensors_name`, else `pickle_name`, in `path`; None when neither exists.

    safetensors wins when both exist: it cannot carry code. The pickle is read
    with `weights_only=True`, so a file that would run code is refused.
    """
    st, pk = path / safetensors_name, path / pickle_name
    if st.is_file():
        try:
            return load_file(str(st), device="cpu")
        except Exception as e:  # safetensors raises several types for corrupt files
            raise AdapterError(f"{safetensors_name} is corrupt or truncated: {e}") from e
    if not pk.is_file():
        return None
    try:
        sd = torch.load(str(pk), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(
            f"{pickle_name} could not be loaded safely (only plain tensors are accepted, "
            f"pickled code is refused): {type(e).__name__}"
        ) from e
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise AdapterError(f"{pickle_name} does not hold a dict of named tensors")
    return sd


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """PEFT's own preference: adapter_model.safetensors, else adapter_model.bin."""
    sd = load_tensor_file(path, SAFETENSORS_FILE, BIN_FILE)
    if sd is not None:
        return sd
    raise AdapterError(f"adapter has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def _pattern_value(patterns: dict, module_path: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern: a key matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def _pair_tensors(
    sd: dict[str, torch.Tensor],
) -> dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]]:
    """(layer, module name) -> (module path inside the layer, {"A": lora_A, "B": lora_B}).

    The name is the path's last component because that is what the engine and
    the model's projection list use; the full path is kept for PEFT's patterns.
    Two paths in one layer ending in the same name would share a slot in the
    engine, so they are refused rather than silently merged.
    """
    pairs: dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in sd.items():
        m = _KEY_RE.search(name)
        if m is None:
            raise AdapterError(
                f"unexpected tensor {name!r} in adapter (not a LoRA A/B weight of a decoder layer)"
            )
        layer, path_in_layer, side = int(m.group(1)), m.group(2), m.group(3)
        module = path_in_layer.rsplit(".", 1)[-1]
        seen_path, sides = pairs.setdefault((layer, module), (path_in_layer, {}))
        if seen_path != path_in_layer:
            raise AdapterError(
                f"layer {layer} has two LoRA modules named {module!r} ({seen_path}, {path_in_layer})"
            )
        if side in sides:
            raise AdapterError(f"layer {layer} {path_in_layer} has more than one lora_{side}")
        sides[side] = tensor
    return pairs


def check_config(cfg: dict) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"unsupported adapter type {peft_type!r}: only LoRA adapters are served")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora=true) are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError("LoRA adapters with trained biases (bias != 'none') are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"adapters with modules_to_save={cfg['modules_to_save']} are not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or not 0 < r <= 4096:
        raise AdapterError(f"adapter_config.json has an invalid rank r={r!r}")


def parse_peft_adapter(path: str | Path, key: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory; shape checks against the base model happen in validation."""
    path = Path(path)
    cfg = read_adapter_config(path)
    check_config(cfg)
    sd = load_state_dict(path)
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    pairs = _pair_tensors(sd)
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, module), (path_in_layer, ab) in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module} has lora_{next(iter(ab))} without its partner")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"layer {layer} {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit"
            )
        mpath = f"model.layers.{layer}.{path_in_layer}"
        mr = int(_pattern_value(rank_pattern, mpath, r))
        if a.shape[0] != mr:
            raise AdapterError(f"layer {layer} {module}: rank {a.shape[0]} does not match config rank {mr}")
        ma = float(_pattern_value(alpha_pattern, mpath, alpha))
        scale = ma / math.sqrt(mr) if rslora else ma / mr
        modules[(layer, module)] = LoraModuleWeights(a=a.contiguous(), b=b.contiguous(), scale=scale)
    if not modules:
        raise AdapterError("adapter holds no LoRA weights")
    targets = tuple(sorted({m for _, m in modules}))
    return LoraAdapter(
        key=key or str(path.resolve()),
        rank=r,
        alpha=alpha,
        use_rslora=rslora,
        target_modules=targets,
        modules=modules,
        base_model_name=cfg.get("base_model_name_or_path"),
        config=cfg,
    )
