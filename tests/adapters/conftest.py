"""Fixtures for adapter tests live in tests/fixtures/adapter_peers.py so other test packages can reuse them."""

from tests.fixtures.adapter_peers import (  # noqa: F401  (pytest fixtures)
    fake_hub,
    fake_pbase,
    make_store,
    peft_adapters,
    s3_env,
    s3_server,
    tiny_llama,
)
