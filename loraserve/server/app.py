"""Assemble the FastAPI application around a running `AsyncEngine`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from loraserve import __version__
from loraserve.adapters.store import local_adapter_store
from loraserve.cpu_threads import helper_pool
from loraserve.server import routes_extra, routes_info, routes_lorax, routes_openai
from loraserve.server.adapter_registry import AdapterProvider, AdapterRegistry
from loraserve.server.config import ServerConfig
from loraserve.server.errors import install_error_handlers
from loraserve.server.generation import GenerationService
from loraserve.server.metrics import ServerMetrics
from loraserve.server.request_counter import RequestCounter
from loraserve.server.request_guard import RequestGuard
from loraserve.server.state import ServerState

log = logging.getLogger("loraserve.server")


def build_state(config: ServerConfig, aengine: Any, provider: AdapterProvider | None = None) -> ServerState:
    engine = aengine.engine
    provider = provider or local_adapter_store(engine.model_config)
    registry = AdapterRegistry(
        provider, config.default_adapter_source, config.adapter_id, config.adapter_source
    )
    metrics = ServerMetrics(
        config.max_adapter_labels,
        config.max_listed_adapters,
        [i for i in (config.adapter_id, *config.preloaded_adapter_ids) if i],
    )
    service = GenerationService(aengine, registry, metrics, config.max_concurrent_requests)
    metrics.engine_stats = aengine.stats
    metrics.adapter_stats = registry.stats
    metrics.in_flight = lambda: service.limiter.in_flight
    return ServerState(
        config=config,
        aengine=aengine,
        tokenizer=engine.tokenizer,
        registry=registry,
        metrics=metrics,
        service=service,
        limits=engine.limits,
    )


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # asyncio.to_thread work (adapter parsing) must not start OpenMP pools: see cpu_threads
        asyncio.get_running_loop().set_default_executor(helper_pool(4, "loraserve-io"))
        c = state.config
        if c.adapter_id or c.preloaded_adapter_ids:
            await state.registry.preload(
                c.preloaded_adapter_ids, c.preloaded_adapter_source or c.adapter_source
            )
            log.info("preloaded adapters: %s", ", ".join(state.registry.preloaded_ids))
        yield
        state.aengine.shutdown()
        state.registry.close()

    app = FastAPI(
        title="loraserve",
        version=__version__,
        lifespan=lifespan,
        description="One base model, many LoRA adapters. LoRAX-compatible REST API and "
        "OpenAI-compatible API.",
    )
    app.state.loraserve = state
    install_error_handlers(app)
    if state.config.cors_allow_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=state.config.cors_allow_origin,
            allow_methods=["*"],
            allow_headers=["*"],
        )

    app.add_middleware(RequestCounter, counter=state.metrics.requests)
    state.metrics.install(app, state.aengine.engine)  # LoRAX's request metrics; times forward passes
    # Added last, so it runs first: oversized or non-UTF-8 bodies never reach FastAPI.
    app.add_middleware(
        RequestGuard,
        max_body_bytes=state.config.max_request_bytes,
        body_timeout_s=state.config.body_read_timeout_s,
    )

    app.include_router(routes_lorax.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_info.router)
    app.include_router(routes_extra.router)
    return app
