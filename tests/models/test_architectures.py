"""Every architecture on the projection-declaration seam against transformers + peft: Phi-3
(LoRA on fused modules), Gemma 2 (soft-capping, sliding windows, (1 + w) norms), Qwen3 (q/k
norms) and Mistral with a sliding window shorter than the sequences. Logits within fp32
tolerance, greedy tokens equal, mixed-adapter batches row by row, on both CPU backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.adapters.validation import validate_adapter
from loraserve.engine.engine import Engine, EngineConfig
from loraserve.engine.params import SamplingParams
from loraserve.models.config import ModelConfig
from tests.fixtures.native import native_kernel_or_skip
from tests.fixtures.tiny_models import hf_greedy, load_hf_model, make_peft_adapter, make_tiny_model

ARCHS = ["phi3", "gemma2", "qwen3", "mistral_sw"]
TARGETS = {
    "phi3": [
        ("qkv_proj", "o_proj"),
        ("gate_up_proj", "down_proj"),
        ("qkv_proj", "gate_up_proj", "down_proj"),
    ],
    "default": [("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ("k_proj", "o_proj", "up_proj")],
}
PROMPTS = [
    [1, 17, 33, 90, 5, 61, 7],
    [1, 200, 3, 44],
    [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80],
]
NEW = 20  # 24 + 20 positions: far past the 8-token windows


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(arch)
        model = make_tiny_model(root / "model", arch, seed=7)
        targets = TARGETS.get(arch, TARGETS["default"])
        adapters = [
            make_peft_adapter(model, root / f"a{i}", r=4 + 4 * i, target_modules=t, seed=300 + i)
            for i, t in enumerate(targets)
        ]
        out[arch] = (model, adapters)
    return out


def make_engine(path: Path, native: bool) -> Engine:
    return Engine.from_pretrained(
        path,
        EngineConfig(
            kv_cache_memory_bytes=32 << 20,
            adapter_memory_bytes=32 << 20,
            max_lora_rank=16,
            native_kernels=native,
        ),
    )


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_matches_transformers_and_peft(
    arch_dirs: dict[str, tuple[Path, list[Path]]], arch: str, backend: str
) -> None:
    from peft import PeftModel

    if backend == "native":
        native_kernel_or_skip()
    model_dir, adapter_dirs = arch_dirs[arch]
    engine = make_engine(model_dir, backend == "native")
    assert (engine.ops_name == "cpu-native") == (backend == "native")
    adapters = [parse_peft_adapter(p) for p in adapter_dirs]
    for a in adapters:
        validate_adapter(a, engine.model_config, max_rank=16)
    # base rows and every adapter in one continuous batch, prompts of different lengths
    rows = [(PROMPTS[i % len(PROMPTS)], adapters[i], adapter_dirs[i]) for i in range(len(adapters))]
    rows += [(PROMPTS[2], None, None), (PROMPTS[0], None, None)]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos_token=True)
    results = engine.generate([r[0] for r in rows], params, [r[1] for r in rows])
    for ids, adapter, path in rows:
        ref = load_hf_model(model_dir, attn_implementation="eager")
        if path is not None:
            ref = PeftModel.from_pretrained(ref, path).eval()
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(engine.prompt_logits(ids, adapter), want, atol=1e-4, rtol=1e-4)
        got = results[rows.index((ids, adapter, path))]
        assert [t.id for t in got.tokens] == hf_greedy(ref, ids, NEW), f"{arch} row with adapter {path}"
    stats = engine.stats()
    assert stats["free_blocks"] == stats["total_blocks"] and stats["adapter_slots_in_use"] == 0


def test_sliding_window_changes_the_output(
    arch_dirs: dict[str, tuple[Path, list[Path]]], tmp_path: Path
) -> None:
    """The window is really applied: the same weights without it give other logits past it."""
    model_dir, _ = arch_dirs["mistral_sw"]
    full = make_tiny_model(tmp_path / "full", "mistral_sw", seed=7, sliding_window=None)
    ids = PROMPTS[2]
    windowed = make_engine(model_dir, native=False).prompt_logits(ids)
    unwindowed = make_engine(full, native=False).prompt_logits(ids)
    torch.testing.assert_close(windowed[:8], unwindowed[:8], atol=1e-5, rtol=1e-5)  # inside the window
    assert (windowed[8:] - unwindowed[8:]).abs().max() > 1e-3


def test_declarations_derive_the_lora_targets(arch_dirs: dict[str, tuple[Path, list[Path]]]) -> None:
    phi3 = ModelConfig.from_dir(arch_dirs["phi3"][0])
    assert list(phi3.linear_shapes()) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert phi3.linear_shapes()["qkv_proj"] == (64, 64 + 2 * 32)
    gemma = ModelConfig.from_dir(arch_dirs["gemma2"][0])
    assert gemma.layer_windows == [8, None, 8]
    qwen3 = ModelConfig.from_dir(arch_dirs["qwen3"][0])
    assert qwen3.linear_shapes()["q_proj"] == (64, 4 * 24) and qwen3.layer_windows == [None, None]


def test_unknown_architecture_is_refused_with_the_supported_list(tmp_path: Path) -> None:
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'.*Gemma2ForCausalLM"):
        ModelConfig.from_dir(tmp_path)


def test_attention_cost_context_of_known_shapes(tmp_path: Path) -> None:
    """SmolLM-135M: 3.54M projection weights per layer over 2 x 9 heads x 64 = 3,072 keys; a
    7B Llama: ~24.7k. The chunked-prefill scheduler sizes chunks by it."""
    import json

    shapes = {
        "smollm": (576, 1536, 9, 3, 3072),
        "llama7b": (4096, 11008, 32, 32, 24704),
    }
    for name, (hidden, inter, heads, kv, expected) in shapes.items():
        d = tmp_path / name
        d.mkdir()
        cfg = dict(
            architectures=["LlamaForCausalLM"],
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=1000,
        )
        (d / "config.json").write_text(json.dumps(cfg))
        assert ModelConfig.from_dir(d).attention_cost_context() == expected
