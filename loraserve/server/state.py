"""What every route needs, hung on `app.state.loraserve` so routes stay free of globals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from loraserve.engine.memory_plan import Limits
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
    limits: Limits  # what the engine resolved: read here, never copied into `config`


def get_state(request: Request) -> ServerState:
    return request.app.state.loraserve
