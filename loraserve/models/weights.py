"""Memory-mapped reading of Hugging Face safetensors checkpoints.

`safe_open` maps the file; tensors are materialised one at a time directly in
the target dtype/device, so peak host memory stays near one tensor, and no
`transformers` model is ever built. A directory made for a GGUF file (models/gguf.py)
is read from that file instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        from loraserve.models.config import ModelLoadError

        raise ModelLoadError(f"no *.safetensors weights in {path} (only safetensors checkpoints are read)")
    return files


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from loraserve.models.gguf import gguf_pointer, iter_gguf_weights

    gguf_file = gguf_pointer(path)
    if gguf_file is not None:  # a GGUF checkpoint (models/gguf.py): dequantised tensor by tensor
        yield from iter_gguf_weights(gguf_file)
        return
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_checkpoint(
    path: Path, num_layers: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(per decoder layer: {name inside the layer: tensor}, everything else by full name), in the
    serving dtype on the device; on CPU in the checkpoint's dtype these are views of the mapping."""
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    top: dict[str, torch.Tensor] = {}
    for name, t in iter_weights(Path(path)):
        t = t.to(device=device, dtype=dtype)
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            per_layer[int(idx)][rest] = t
        else:
            top[name] = t
    return per_layer, top
