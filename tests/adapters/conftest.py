from tests.fixtures.adapter_peers import (  # noqa: F401  (pytest fixtures)
    fake_hub,
    fake_pbase,
    peft_adapters,
    s3_env,
    s3_server,
    tiny_llama,
)
