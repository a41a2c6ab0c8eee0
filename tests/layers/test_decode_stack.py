"""The one-call decode stack (layers/decode_stack.py, csrc/decode_stack_cpu.cpp) against the
model's own Python loop over the same kernels: bit for bit, in every precision and build, and
only on the steps it covers. (The engine oracles against transformers run it too: their decode
steps without adapters go through it.) The engines here step one at a time (`decode_steps=1`):
a decode burst runs the same stack from native code (tests/engine/test_decode_bursts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loraserve.adapters.peft_format import parse_peft_adapter
from loraserve.engine.engine import Engine
from loraserve.engine.params import SamplingParams
from loraserve.layers.decode_stack import DecodeStack
from loraserve.layers.ops_cpu import ENV_DECODE_REGION, ENV_FUSED_LORA
from loraserve.layers.ops_lowp_cpu import LowpCpuOps
from tests.fixtures.call_counter import count_taken
from tests.fixtures.engines import cpu_engine
from tests.fixtures.native import BUILDS, use_build
from tests.fixtures.tiny_models import make_peft_adapter, make_tiny_model

PROMPTS = [[1, 17, 33, 90, 5, 61, 7], [1, 200, 3, 44], [1, 9, 9, 9, 120, 77, 31, 18, 250, 11, 42, 5, 6]]
NEW_TOKENS = 10
PRECISIONS = {  # engine flags
    "fp32": {},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantize": "int8"},
    "int8-bf16": {"dtype": "bfloat16", "quantize": "int8"},
    "bf16-kv": {"kv_cache_dtype": "bfloat16"},
}


def engine_with_stack(model_dir: Path, stack_on: bool, **flags) -> Engine:
    """A native engine whose model built its decode stack, set aside unless `stack_on` (the
    model's Python loop then runs every step)."""
    engine = cpu_engine(model_dir, "native", max_lora_rank=16, **flags, decode_steps=1)
    assert engine.runner.model.decode_stack is not None
    if not stack_on:
        engine.runner.model.decode_stack = None
    return engine


def greedy(engine: Engine, adapters: list | None = None) -> list[list[tuple[int, float | None]]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    results = engine.generate(PROMPTS, params, adapters)
    return [[(t.id, t.logprob) for t in res.tokens] for res in results]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, tied embedding
def test_stack_equals_the_python_loop(
    tiny_model_dirs: dict[str, Path],
    arch: str,
    precision: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    use_build(build, monkeypatch)
    engine = cpu_engine(tiny_model_dirs[arch], "native", **PRECISIONS[precision], decode_steps=1)
    model = engine.runner.model
    assert model.decode_stack is not None
    ran = count_taken(monkeypatch, DecodeStack, "__call__")
    with_stack = greedy(engine)
    # every decode step of the three rows ran the stack, each in one parallel region; the prefill did not
    assert ran.count(True) == NEW_TOKENS - 1 and ran.count(False) >= 1
    assert model.decode_stack.native.region_runs() == NEW_TOKENS - 1
    stack, model.decode_stack = model.decode_stack, None
    try:
        assert greedy(engine) == with_stack  # token ids and logprobs, exactly
    finally:
        model.decode_stack = stack
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


LORA_CASES = {  # engine flags; fp32 runs the fused base + LoRA pass, the others base then row kernel
    "fp32": {},
    "fp32-two-pass": {},
    "int8": {"quantize": "int8"},
    "bf16": {"dtype": "bfloat16"},
    "bf16-fp32-adapters": {"dtype": "bfloat16", "adapter_dtype": "float32"},
}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_adapter_rows_equal_the_python_loop(
    llama_dir: Path,
    llama_adapters: list[Path],
    case: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    """Rows on adapters of ranks 8 (every module, rsLoRA) and 4 beside a base row, then a rank-16
    one: the slot table is re-allocated between the two, so the stack must take its new views.
    Three rows: every decode step runs in one parallel region, adapter deltas and all."""
    use_build(build, monkeypatch)
    if case == "fp32-two-pass":
        monkeypatch.setenv(ENV_FUSED_LORA, "0")
    adapters = [parse_peft_adapter(llama_adapters[i]) for i in (3, 0, 2)]  # ranks 8, 4, 16
    ran = count_taken(monkeypatch, DecodeStack, "__call__")
    runs = []
    for stack_on in (True, False):
        engine = engine_with_stack(llama_dir, stack_on, **LORA_CASES[case])
        model = engine.runner.model
        offered = len(ran)
        first = greedy(engine, [adapters[0], None, adapters[1]])  # rank 8 and 4: the table's 8
        rank_before = engine.runner.lora.rank
        second = greedy(engine, [adapters[2], adapters[0], None])
        assert engine.runner.lora.rank == 16 > rank_before  # the table grew between the two
        assert engine.stats()["adapter_slots_in_use"] == 0
        assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
        # with the stack, it ran every decode step, adapter rows and all; without, none was offered
        taken = ran[offered:]
        assert taken.count(True) == (2 * (NEW_TOKENS - 1) if stack_on else 0)
        assert taken.count(False) >= (2 if stack_on else 0)  # each call's prefill declined
        if stack_on:
            assert model.decode_stack.native.region_runs() == 2 * (NEW_TOKENS - 1)
        runs.append((first, second))
    assert runs[0] == runs[1]  # token ids and logprobs, exactly


# 24 rows: past the region's 4 rows and from the 20 where bf16 / int8 panels run each row's LoRA
# between two panels (csrc/gemm_lowp_lora_cpu.cpp) in builds that compute them panel by panel
WIDE_PROMPTS = [[1 + (7 * i + 11 * j) % 380 for j in range(3 + i % 6)] for i in range(24)]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("case", ["int8", "int8-bf16"])
def test_many_adapter_rows_on_lowp_panels_equal_the_python_loop(
    llama_dir: Path,
    llama_adapters: list[Path],
    case: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    """24 rows on three adapters (fp32 and bf16 tables) and none: the stack's per-kernel path
    gives the Python loop's tokens and logprobs exactly. The AVX2 build runs these steps' int8
    projections with each row's LoRA between the panels (LowpCpuOps.linear_lora takes them in the
    loop; the stack asks the kernel the same question)."""
    use_build(build, monkeypatch)
    adapters = [parse_peft_adapter(llama_adapters[i]) for i in (3, 0, 2)]
    rows = [adapters[i % 4] if i % 4 < 3 else None for i in range(len(WIDE_PROMPTS))]
    taken = count_taken(monkeypatch, LowpCpuOps, "linear_lora")
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    runs = []
    for stack_on in (True, False):
        engine = engine_with_stack(llama_dir, stack_on, **PRECISIONS[case])
        model = engine.runner.model
        before = len(taken)
        res = engine.generate(WIDE_PROMPTS, params, rows)
        runs.append([[(t.id, t.logprob) for t in r.tokens] for r in res])
        fused = taken[before:].count(True)
        # the loop's decode steps: 4 projection groups a layer (the stack's steps never ask)
        kernels = model.ops.kernels
        if stack_on or kernels.simd_bits() != 256:
            assert fused == 0
        else:
            assert fused == (NEW_TOKENS - 1) * 4 * len(model.layers)
        assert engine.stats()["adapter_slots_in_use"] == 0
        assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
    assert runs[0] == runs[1]


ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPLIT_CASES = {  # engine flags: the fused pass's deltas (added apart), the row kernel's (onto y)
    "fp32": {},
    "int8": {"quantize": "int8"},
}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
@pytest.mark.parametrize("heads", ["16", "64"])
def test_region_threads_split_adapter_rows_bit_for_bit(
    llama_dir: Path,
    head64_dir: Path,
    llama_adapters: list[Path],
    tmp_path: Path,
    heads: str,
    case: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    """The region's threads split each projection's adapter rows (csrc/region_lora.h: one chain
    of the shrink's sums each, then the deltas of their own columns), with the same tokens and
    logprobs as the Python loop. A rank-32 adapter on every module gives the AVX2 build's
    shrink a block of one chain beside blocks of two; two rows on one adapter are a block of the
    row kernel (int8), which the split leaves to one thread, where the fused pass's rows split.
    Heads of 64 are two whole panels: q|k|v splits by heads and each thread adds the deltas of its
    heads' columns, then rotates them (heads of 16 share a panel: one thread rotates them all)."""
    use_build(build, monkeypatch)
    model_dir = head64_dir if heads == "64" else llama_dir
    wide = parse_peft_adapter(
        make_peft_adapter(model_dir, tmp_path / "r32", r=32, target_modules=ALL_MODULES, seed=7)
    )
    other = parse_peft_adapter(  # rank 8, every module
        llama_adapters[3]
        if heads == "16"
        else make_peft_adapter(model_dir, tmp_path / "r8", r=8, target_modules=ALL_MODULES, seed=3)
    )
    runs, splits = [], []
    for stack_on in (True, False):
        engine = cpu_engine(model_dir, "native", max_lora_rank=32, **SPLIT_CASES[case], decode_steps=1)
        model = engine.runner.model
        native = model.decode_stack.native
        if not stack_on:
            model.decode_stack = None
        before = native.split_runs()
        first = greedy(engine, [wide, other, None])
        split_first = native.split_runs() - before
        second = greedy(engine, [wide, wide, other])
        runs.append((first, second))
        splits.append((split_first, native.split_runs() - before - split_first))
    assert runs[0] == runs[1]  # token ids and logprobs, exactly
    every = (NEW_TOKENS - 1) * 4 * len(native)  # each projection of each step
    assert splits == [(every, every if case == "fp32" else 0), (0, 0)]


MANY_PROMPTS = PROMPTS + [[1, 2, 3], [1, 50, 60, 70, 80], [1, 300]]  # 6 rows: past the region's 4
# one row with 80 positions of context: attention splits them in two parts (two threads, at
# least 32 positions a part) that the region's threads merge each into their own copy
LONG_PROMPT = [[1 + (7 * i) % 380 for i in range(80)]]


@pytest.fixture(scope="module")
def head64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with 64-wide heads (2 query heads, 1 KV head): the head size the attention
    kernel keeps in registers and splits by positions (the tiny models' 16 is neither on AVX-512)."""
    root = tmp_path_factory.mktemp("head64")
    return make_tiny_model(
        root / "llama", "llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1
    )


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("heads", ["16", "64"])
def test_one_region_equals_the_per_kernel_stack(
    llama_dir: Path,
    head64_dir: Path,
    heads: str,
    precision: str,
    build: str,
    monkeypatch: pytest.MonkeyPatch,
    two_threads: object,
) -> None:
    """Decode steps of up to 4 rows run in one parallel region (csrc/decode_stack_cpu.cpp
    `run_region`): the same tokens and logprobs, bit for bit, as the stack's per-kernel path
    (`LORASERVE_DECODE_REGION=0`), at 1 and 3 rows and with a context long enough to split
    attention (head size 64); at 6 rows the region declines."""
    use_build(build, monkeypatch)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)
    runs, regions = [], []
    for region in ("1", "0"):
        monkeypatch.setenv(ENV_DECODE_REGION, region)
        engine = cpu_engine(
            head64_dir if heads == "64" else llama_dir, "native", **PRECISIONS[precision], decode_steps=1
        )
        native = engine.runner.model.decode_stack.native
        out = []
        for prompts in (PROMPTS[:1], PROMPTS, LONG_PROMPT, MANY_PROMPTS):
            before = native.region_runs()
            res = engine.generate(prompts, params)
            out.append([[(t.id, t.logprob) for t in r.tokens] for r in res])
            regions.append(native.region_runs() - before)
        runs.append(out)
        assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]
    assert runs[0] == runs[1]
    steps = NEW_TOKENS - 1
    assert regions == [steps, steps, steps, 0, 0, 0, 0, 0]


def test_an_error_inside_the_region_reaches_the_caller(
    llama_dir: Path, llama_adapters: list[Path], two_threads: object
) -> None:
    """A kernel that refuses its input inside the region (here the adapter rows' kernel, a slot
    out of range, where one thread adds each projection's deltas) raises in the caller, with every
    thread out of the region: the next step runs. What the region checks once before it starts
    (attention's cache slots, for every layer) raises the same way."""
    engine = cpu_engine(llama_dir, "native", decode_steps=1)
    stack = engine.runner.model.decode_stack
    calls: list[tuple] = []
    real = stack.native
    real.set_lora_split(False)  # one thread adds the deltas, inside the region (this engine's stack only)

    class Recorder:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def run(self, *args: object, **kwargs: object) -> torch.Tensor:
            calls.append((args, kwargs))
            return real.run(*args, **kwargs)

    stack.native = Recorder()
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos_token=True)
        engine.generate(PROMPTS[:1], params, [parse_peft_adapter(llama_adapters[3])])
    finally:
        stack.native = real
    x, h, cos, sin, slots, tables, lens, rows, row_slots, rank = calls[0][0]
    before = real.region_runs()
    with pytest.raises(RuntimeError, match="row or slot out of range"):
        real.run(x.clone(), h, cos, sin, slots, tables, lens, rows, torch.full_like(row_slots, 10**6), rank)
    with pytest.raises(RuntimeError, match="cache slot out of range"):
        real.run(x.clone(), h, cos, sin, torch.full_like(slots, -1), tables, lens, rows, row_slots, rank)
    assert real.region_runs() == before + 2
    y = real.run(x.clone(), h, cos, sin, slots, tables, lens, rows, row_slots, rank)
    assert torch.isfinite(y).all()


def test_layers_the_stack_cannot_run_keep_the_python_loop(tiny_model_dirs: dict[str, Path]) -> None:
    """A sliding-window layer (Mistral's, when the context could exceed it) is not the stack's:
    the model keeps its own loop for every step instead of running part of the stack."""
    engine = cpu_engine(tiny_model_dirs["llama"], "torch", decode_steps=1)
    assert engine.runner.model.decode_stack is None  # the PyTorch backend has no stack
    native = cpu_engine(tiny_model_dirs["llama"], "native", decode_steps=1)
    layer = native.runner.model.layers[0]
    layer.window = 16
    assert layer.stack_spec(layer.post_norm) is None
