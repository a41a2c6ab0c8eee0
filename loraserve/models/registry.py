"""architectures[0] of a checkpoint's config.json -> the class that runs it."""

from __future__ import annotations

from loraserve.models.base import DecoderModel
from loraserve.models.config import SUPPORTED_ARCHITECTURES
from loraserve.models.llama import LlamaModel


def model_class(architecture: str) -> type[DecoderModel]:
    from loraserve.models.gemma2 import Gemma2Model
    from loraserve.models.phi3 import Phi3Model

    classes: dict[str, type[DecoderModel]] = {
        "LlamaForCausalLM": LlamaModel,
        "MistralForCausalLM": LlamaModel,
        "Qwen2ForCausalLM": LlamaModel,
        "Qwen3ForCausalLM": LlamaModel,
        "Phi3ForCausalLM": Phi3Model,
        "Gemma2ForCausalLM": Gemma2Model,
    }
    assert set(classes) == set(SUPPORTED_ARCHITECTURES)
    if architecture not in classes:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return classes[architecture]
