"""Memory-mapped reading of Hugging Face safetensors checkpoints.

`safe_open` maps the file; each tensor is read when the model asks for it, directly in the
target dtype/device, and not kept here (`LazyWeights`), so while a model is built host memory
holds what it has packed plus the tensor it is packing, and no `transformers` model is ever
built. A directory made for a GGUF file (models/gguf.py) is read from that file instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from loraserve.host_allocator import return_freed_memory


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


# malloc hands freed memory back every this many bytes read: a load's temporaries leave holes
# between the packed weights that only a trim returns (the ~1B shape's Q8_0 GGUF with
# `--quantize int8`: peak 3.75 -> 2.76 GB for 2.0 GB after load; trimming before every tensor,
# 2.38 GB, cost ~40 % more load time re-faulting the pages; every GiB cost none measurable)
TRIM_EVERY = 1 << 30


class LazyWeights(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by name, each read from its file (and converted) when asked for,
    and never kept here.

    Why: a model packs each matrix into its own layout (panels, int8, bf16) as it is built, so
    a loaded tensor is needed once, for as long as packing it takes. Reading the whole checkpoint
    first held every matrix in the load dtype at once: 2.4-3.5 x the memory the server then keeps
    (a ~1B Llama shape, 2-core Zen 5: a Q8_0 GGUF with `--quantize int8` peaked at 7.1 GB for a
    2.1 GB server, its F32 GGUF at 10.1 GB for 5.2 GB), which is what decides whether a model
    fits a machine at all. Asking twice reads twice: models read each tensor once.
    """

    def __init__(
        self,
        readers: dict[str, Callable[[], torch.Tensor]],
        convert: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self._readers, self._convert = readers, convert

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._convert(self._readers[name]())

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def weight_readers(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor's name and how to read it (GGUF: dequantised to fp32, Hugging Face names)."""
    from loraserve.models.gguf import gguf_pointer, gguf_weight_readers

    gguf_file = gguf_pointer(path)
    if gguf_file is not None:
        return gguf_weight_readers(gguf_file)
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for file in checkpoint_files(path):
        f = safe_open(str(file), framework="pt", device="cpu")  # open while a reader needs it
        for name in f.keys():
            readers[name] = partial(f.get_tensor, name)
    return readers


def load_checkpoint(
    path: Path,
    num_layers: int,
    dtype: torch.dtype,
    device: torch.device,
    vector_dtype: torch.dtype | None = None,
) -> tuple[list[LazyWeights], LazyWeights]:
    """(per decoder layer: {name inside the layer: tensor}, everything else by full name), read
    on demand in `dtype` on the device (on CPU in the checkpoint's dtype: views of the mapping).
    Vectors (norms, biases) then go to `vector_dtype` when given: read in `dtype` first, so a
    bf16 model's norms served in fp32 are the bf16 values, exactly."""
    per_layer: list[dict[str, Callable[[], torch.Tensor]]] = [{} for _ in range(num_layers)]
    top: dict[str, Callable[[], torch.Tensor]] = {}
    for name, read in weight_readers(Path(path)).items():
        if name.startswith("model.layers."):
            idx, rest = name[len("model.layers.") :].split(".", 1)
            per_layer[int(idx)][rest] = read
        else:
            top[name] = read

    since_trim = [0]  # bytes read since malloc last handed freed memory back

    def convert(t: torch.Tensor) -> torch.Tensor:
        since_trim[0] += t.nbytes
        if since_trim[0] > TRIM_EVERY:
            return_freed_memory()
            since_trim[0] = 0
        t = t.to(device=device, dtype=dtype)
        return t.to(vector_dtype) if vector_dtype is not None and t.dim() < 2 else t

    return [LazyWeights(r, convert) for r in per_layer], LazyWeights(top, convert)
