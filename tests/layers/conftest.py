"""Both LoRA paths: PyTorch (`bmm`) and, where a C++ compiler exists, the native CPU kernel."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.fixtures.native import native_kernel_or_skip


@pytest.fixture(params=["torch", "native"])
def lora_kernel(request: pytest.FixtureRequest) -> ModuleType | None:
    return native_kernel_or_skip() if request.param == "native" else None
