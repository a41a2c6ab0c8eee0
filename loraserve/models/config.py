"""The subset of a Hugging Face `config.json` that the model code needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.models.spec import Projection, linear_shapes

# architectures[0] of config.json -> model family (models/registry.py holds the classes)
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
)


class ModelLoadError(ValueError):
    """The base model cannot be served as given (no config, unknown architecture, no weights):
    the CLI prints the message and exits 2, no traceback."""


def _layer_windows(arch: str, cfg: dict, num_layers: int) -> list[int | None]:
    """Sliding-window size of each layer (None: full attention), by HF's rules for the family.

    `layer_types` (written by recent transformers) is authoritative; otherwise Mistral and
    Phi-3 slide on every layer when `sliding_window` is set, Qwen2/3 only with
    `use_sliding_window` from `max_window_layers` on, Gemma 2 on even layers.
    """
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [window if t == "sliding_attention" else None for t in types]
    if not window:
        return [None] * num_layers
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not cfg.get("use_sliding_window", False):
            return [None] * num_layers
        first = cfg.get("max_window_layers", num_layers)
        return [window if i >= first else None for i in range(num_layers)]
    if arch == "Gemma2ForCausalLM":
        return [window if i % 2 == 0 else None for i in range(num_layers)]
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        return [window] * num_layers
    return [None] * num_layers


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    layer_windows: list[int | None] = field(default_factory=list)  # sliding window per layer
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    name_or_path: str = ""
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            cfg = json.loads((path / "config.json").read_text())
        except FileNotFoundError as e:
            raise ModelLoadError(f"{path} has no config.json: is it a Hugging Face model directory?") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from e
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            gen = json.loads(gen_path.read_text())
            eos = gen.get("eos_token_id", eos)
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        qwen = arch == "Qwen2ForCausalLM"
        layers = cfg["num_hidden_layers"]
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta/scaling in here
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", qwen)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_windows=_layer_windows(arch, cfg, layers),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            name_or_path=cfg.get("_name_or_path") or str(path),
            raw=cfg,
        )

    def projections(self) -> list[Projection]:
        """The architecture's projection declaration (models/spec.py)."""
        from loraserve.models.registry import model_class  # the model modules import this one

        return model_class(self.architecture).projections(self)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection; adapters are validated against it."""
        return linear_shapes(self.projections())

    def attention_cost_context(self) -> int:
        """The context length at which one prompt token's attention (QK and PV over that many
        keys, every query head) costs as many FLOPs as its projections: the chunked-prefill
        scheduler sizes chunks by it, so a chunk deep into a long prompt takes fewer tokens."""
        per_layer = sum(i * o for i, o in self.linear_shapes().values())
        return max(1, per_layer // (2 * self.num_attention_heads * self.head_dim))
