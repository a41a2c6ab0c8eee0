"""What every route needs, hung on `app.state.loraserve` so routes stay free of globals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from loraserve.server.adapter_registry import AdapterRegistry
from loraserve.server.config import ServerConfig
from loraserve.server.generation import GenerationService
from loraserve.server.metrics import ServerMetrics


@dataclass
class ServerState:
    config: ServerConfig
    aengine: Any  # loraserve.engine.async_engine.AsyncEngine
    tokenizer: Any  # loraserve.engine.tokenizer.Tokenizer
    registry: AdapterRegistry
    metrics: ServerMetrics
    service: GenerationService
    max_lora_rank: int | None = None


def get_state(request: Request) -> ServerState:
    return request.app.state.loraserve
