"""Both LoRA paths: PyTorch (`bmm`) and, where a C++ compiler exists, the native CPU kernel in
both builds (the host's and the AVX2 one)."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.fixtures.native import BUILDS, native_kernel_or_skip


@pytest.fixture(params=["torch", *BUILDS])
def lora_kernel(request: pytest.FixtureRequest) -> ModuleType | None:
    return None if request.param == "torch" else native_kernel_or_skip(request.param)


@pytest.fixture(params=BUILDS)
def kernel(request: pytest.FixtureRequest) -> ModuleType:
    """The native CPU kernels of each build: the host's own and the AVX2+FMA one."""
    return native_kernel_or_skip(request.param)
