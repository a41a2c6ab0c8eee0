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

# Bounds on the config and its rank_pattern/alpha_pattern: a real config is a few kB and names
# each module at most once. The bounds keep a crafted config from costing more than the tensors.
MAX_CONFIG_BYTES = 16 << 20
MAX_PATTERN_KEYS = 10_000
MAX_PATTERN_KEY_CHARS = 512
# |lora_alpha / r| above this is no trained adapter: it would swamp the base model's output and
# overflow half-precision activations (NaN/inf for every request batched with it).
MAX_LORA_SCALE = 1e4

_WORD_RE = re.compile(r"\w+")
_ADAPTER_NAME_RE = re.compile(r"[\w-]+")


def _split_key(name: str) -> tuple[int, str, str] | None:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A[.<adapter name>].weight` ->
    (3, "self_attn.q_proj", "A"); None for anything else.

    Split on dots in linear time: a regex search for `layers.<i>.` followed by a lazy path
    backtracks quadratically on crafted names (a 144 kB tensor name held the GIL for 33 s).
    The first `layers.<i>` component whose path up to `lora_A|B` is all word characters wins.
    """
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "weight":
        return None
    if parts[-2] in ("lora_A", "lora_B"):
        side_at = len(parts) - 2
    elif parts[-3] in ("lora_A", "lora_B") and _ADAPTER_NAME_RE.fullmatch(parts[-2]):
        side_at = len(parts) - 3
    else:
        return None
    last_bad = -1  # the last component before the side that is not a plain word
    for i in range(side_at):
        if not _WORD_RE.fullmatch(parts[i]):
            last_bad = i
    for i in range(side_at - 2):
        layer = parts[i + 1]
        if parts[i] == "layers" and layer.isascii() and layer.isdigit() and last_bad < i + 2:
            return int(layer), ".".join(parts[i + 2 : side_at]), parts[side_at][-1]
    return None


def is_lora_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (
        (path / SAFETENSORS_FILE).is_file() or (path / BIN_FILE).is_file()
    )


def read_adapter_config(path: Path) -> dict:
    try:
        size = (path / CONFIG_FILE).stat().st_size
        if size > MAX_CONFIG_BYTES:  # read whole and parsed on a loader thread: bound it first
            raise AdapterError(f"{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES} are read")
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError as e:
        raise AdapterError(f"adapter has no {CONFIG_FILE}") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints past 4,300 digits
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {_shown(str(e))}") from e
    except RecursionError as e:  # deeply nested arrays: refuse, never a 500
        raise AdapterError(f"{CONFIG_FILE} is nested too deeply") from e
    except OSError as e:  # unreadable: permissions, a directory in its place, an I/O error
        raise AdapterError(f"{CONFIG_FILE} cannot be read ({type(e).__name__})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object, not a {type(cfg).__name__}")
    return cfg


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


def _shown(value: object) -> str:
    """`repr` cut to 80 characters: messages echo config values, which a crafted file can make huge."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _literal_key(key: str) -> tuple[str, bool]:
    """The module name a pattern key spells, and whether it is anchored at the path's start.

    PEFT's documentation shows keys such as `^model.decoder.layers.0.encoder_attn.k_proj`,
    and escaped dots (`q\\.proj`) mean the same to its regex; both are read literally here.
    Any other regex syntax stays in the key, matches no module and is refused.
    """
    anchored = key.startswith("^")
    literal = key[1:] if anchored else key
    literal = literal.removesuffix("$").replace("\\.", ".")
    return literal, anchored


class _Patterns:
    r"""PEFT's `rank_pattern`/`alpha_pattern`, matched without regular expressions.

    PEFT (`peft.utils.other.get_pattern_key`) feeds each key to `re.match(rf"(.*\.)?({key})$",
    module_name)` and takes the first key, in config order, that matches. Run on our
    loader thread that is a denial of service: a crafted key backtracks for seconds while
    holding the GIL, freezing the event loop and the step loop with it. Here a key matches
    when it equals the module path or a suffix of it that starts after a `.`, which is what
    the regex does for every key PEFT itself writes (plain module names). The first key in
    config order still wins. A key that matches no module of the adapter is refused
    (`unused`), so a config whose keys were meant as regexes is never served with a
    silently different scale than PEFT would use.
    """

    def __init__(self, cfg: dict, field: str) -> None:
        raw = cfg.get(field)
        self.field = field
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise AdapterError(f"adapter_config.json: {field} must be an object of module name -> value")
        if len(raw) > MAX_PATTERN_KEYS:
            raise AdapterError(
                f"adapter_config.json: {field} has {len(raw)} entries (at most {MAX_PATTERN_KEYS})"
            )
        for key, value in raw.items():
            if len(key) > MAX_PATTERN_KEY_CHARS:
                raise AdapterError(
                    f"adapter_config.json: {field} key {_shown(key)} is longer than {MAX_PATTERN_KEY_CHARS} characters"
                )
            if field == "rank_pattern":
                ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 4096
            else:
                ok = _is_number(value) and math.isfinite(value)
            if not ok:
                kind = "a rank from 1 to 4096" if field == "rank_pattern" else "a finite number"
                raise AdapterError(
                    f"adapter_config.json: {field}[{_shown(key)}] = {_shown(value)} is not {kind}"
                )
        self.values: dict[str, int | float] = raw
        # Normalised key -> (config order, original key), apart for keys anchored with `^`.
        self._suffix: dict[str, tuple[int, str]] = {}
        self._whole: dict[str, tuple[int, str]] = {}
        for i, key in enumerate(raw):
            literal, anchored = _literal_key(key)
            (self._whole if anchored else self._suffix).setdefault(literal, (i, key))
        self._used: set[str] = set()

    def value(self, module_path: str, default: float) -> float:
        parts = module_path.split(".")
        found = [self._whole.get(module_path)]
        found += [self._suffix.get(".".join(parts[i:])) for i in range(len(parts))]
        matches = [m for m in found if m is not None]
        self._used.update(key for _, key in matches)  # matched, even where an earlier key wins
        return self.values[min(matches)[1]] if matches else default

    def check_all_used(self) -> None:
        unused = [k for k in self.values if k not in self._used]
        if unused:
            shown = ", ".join(_shown(k) for k in unused[:3]) + (
                f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            )
            raise AdapterError(
                f"adapter_config.json: {self.field} key {shown} matches no LoRA module of the adapter "
                "(keys are module names such as 'model.layers.0.self_attn.q_proj' or 'q_proj'; "
                "regular expressions are not supported)"
            )


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
        key = _split_key(name)
        if key is None:
            raise AdapterError(
                f"unexpected tensor {_shown(name)} in adapter (not a LoRA A/B weight of a decoder layer)"
            )
        layer, path_in_layer, side = key
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
        raise AdapterError(f"unsupported adapter type {_shown(peft_type)}: only LoRA adapters are served")
    if cfg.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora=true) are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError("LoRA adapters with trained biases (bias != 'none') are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"adapters with modules_to_save={_shown(cfg['modules_to_save'])} are not supported"
        )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= 4096:
        raise AdapterError(f"adapter_config.json has an invalid rank r={_shown(r)}")
    # Every field the parser or validation reads is type-checked here, so a malformed config is a
    # 400 naming the field instead of a TypeError (500) or a load that fails later.
    alpha = cfg.get("lora_alpha", r)
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise AdapterError(f"adapter_config.json: lora_alpha={_shown(alpha)} is not a finite number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise AdapterError(
            f"adapter_config.json: use_rslora={_shown(cfg['use_rslora'])} is not true or false"
        )
    targets = cfg.get("target_modules")
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterError(
            "adapter_config.json: target_modules must be a list of module names or a string, "
            f"not {_shown(targets)}"
        )
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"adapter_config.json: base_model_name_or_path={_shown(base)} is not a string")


def parse_peft_adapter(path: str | Path, key: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA directory; shape checks against the base model happen in validation."""
    path = Path(path)
    cfg = read_adapter_config(path)
    check_config(cfg)
    sd = load_state_dict(path)
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = _Patterns(cfg, "rank_pattern")
    alpha_pattern = _Patterns(cfg, "alpha_pattern")
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
        mr = int(rank_pattern.value(mpath, r))
        if a.shape[0] != mr:
            raise AdapterError(f"layer {layer} {module}: rank {a.shape[0]} does not match config rank {mr}")
        ma = float(alpha_pattern.value(mpath, alpha))
        scale = ma / math.sqrt(mr) if rslora else ma / mr
        if not abs(scale) <= MAX_LORA_SCALE:
            raise AdapterError(
                f"layer {layer} {module}: LoRA scale {scale:g} (lora_alpha {ma:g}, r {mr}) is beyond "
                f"±{MAX_LORA_SCALE:g}; lora_alpha or alpha_pattern is wrong"
            )
        modules[(layer, module)] = LoraModuleWeights(a=a.contiguous(), b=b.contiguous(), scale=scale)
    if not modules:
        raise AdapterError("adapter holds no LoRA weights")
    rank_pattern.check_all_used()
    alpha_pattern.check_all_used()
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
