"""What the reliability tests serve: good adapters for three sources and a zoo of broken ones.

Everything is a real file a careless or hostile user could point the server at:
corrupt and truncated safetensors, a `.bin` whose pickle would run a command,
configs with absurd ranks, an adapter trained for another base model, and a
symlink that escapes the allowed adapter root.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tests.fixtures.server import make_tiny_served_model
from tests.fixtures.tiny_models import make_peft_adapter, make_tiny_model

GOOD = ("alpha", "beta", "gamma", "delta")  # alpha/beta local, gamma via S3, delta via the hub
PWNED_MARKER = "pwned-by-pickle"


class _RunsCommand:
    """Unpickling this calls `os.system`: exactly what `weights_only=True` must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Assets:
    root: Path
    model: Path
    good: dict[str, Path]
    bad: dict[str, Path] = field(default_factory=dict)
    outside: Path | None = None  # a real adapter outside the allowed root

    @property
    def pwned_marker(self) -> Path:
        return self.root / PWNED_MARKER


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def build_assets(root: Path) -> Assets:
    model, good = make_tiny_served_model(root, GOOD)
    alpha = good["alpha"]
    bad_root = root / "adapters" / "bad"
    bad: dict[str, Path] = {}

    corrupt = _copy(alpha, bad_root / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    bad["corrupt"] = corrupt

    truncated = _copy(alpha, bad_root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad["truncated"] = truncated

    pickled = _copy(alpha, bad_root / "pickle")
    (pickled / "adapter_model.safetensors").unlink()
    marker = root / PWNED_MARKER
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCommand(marker)}))
    bad["pickle"] = pickled

    absurd = _copy(alpha, bad_root / "absurd-rank")
    _edit_config(absurd, r=10**9, lora_alpha=10**9)
    bad["absurd_rank"] = absurd

    bad["rank_too_big"] = make_peft_adapter(model, bad_root / "rank-128", r=128, seed=5)

    not_json = _copy(alpha, bad_root / "config-not-json")
    (not_json / "adapter_config.json").write_text("{ this is not json")
    bad["config_not_json"] = not_json

    not_lora = _copy(alpha, bad_root / "not-lora")
    _edit_config(not_lora, peft_type="PREFIX_TUNING")
    bad["not_lora"] = not_lora

    other = make_tiny_model(root / "other-model", "mistral")
    bad["other_base"] = make_peft_adapter(other, bad_root / "other-base", r=4, seed=6)

    empty = bad_root / "empty"
    empty.mkdir(parents=True)
    bad["empty_dir"] = empty

    outside = make_peft_adapter(model, root.parent / f"{root.name}-outside" / "adapter", r=4, seed=7)
    link = bad_root / "escape-link"
    link.symlink_to(outside, target_is_directory=True)
    bad["symlink_escape"] = link
    return Assets(root=root, model=model, good=good, bad=bad, outside=outside)
