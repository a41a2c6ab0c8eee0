"""Server-side limits and defaults, decoupled from argparse so tests and the CLI build them alike."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """Everything the HTTP layer needs besides the engine itself.

    Token and capacity limits are not here: the engine resolves them from the model and the
    device (`Engine.limits`), and the server reads that object (`ServerState.limits`).
    """

    model_id: str = ""
    max_concurrent_requests: int = 128
    max_request_bytes: int = 1 << 20
    adapter_timeout_s: float = 30.0
    max_best_of: int = 2  # also caps OpenAI's `n`
    max_prompts_per_request: int = 16  # prompts in one /v1/completions request
    max_stop_sequences: int = 4
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 1.2
    default_adapter_source: str = "hub"
    adapter_id: str | None = None  # static adapter applied when a request names none
    adapter_source: str = "hub"
    preloaded_adapter_ids: list[str] = field(default_factory=list)
    preloaded_adapter_source: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    speculative_tokens: int = 0
    cors_allow_origin: list[str] = field(default_factory=list)
    # Caps against unbounded growth and slow clients (--max-adapter-labels, ...).
    max_adapter_labels: int = 100
    max_listed_adapters: int = 100
    body_read_timeout_s: float = 30.0
