"""Operational routes: `/health`, `/info`, `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from loraserve import __version__
from loraserve.server.schemas import Info
from loraserve.server.speculation import has_default_speculator
from loraserve.server.state import get_state

router = APIRouter(tags=["Server"])


@router.get("/health", summary="200 while the engine's step loop is alive")
async def health(request: Request) -> Response:
    st = get_state(request)
    thread = getattr(st.aengine, "_thread", None)
    if thread is not None and not thread.is_alive():
        return JSONResponse(
            {"error": "engine step loop is not running", "error_type": "unhealthy"}, status_code=503
        )
    return Response(status_code=200)


@router.get("/info", response_model=Info, summary="Model and router limits (LoRAX field names)")
async def info(request: Request) -> Info:
    st = get_state(request)
    c = st.config
    return Info(
        model_id=c.model_id,
        model_dtype=f"torch.{c.dtype}",
        model_device_type=c.device.split(":")[0],
        max_concurrent_requests=c.max_concurrent_requests,
        max_best_of=c.max_best_of,
        max_stop_sequences=c.max_stop_sequences,
        max_input_length=st.limits.max_input_length,
        max_total_tokens=st.limits.max_total_tokens,
        waiting_served_ratio=c.waiting_served_ratio,
        max_batch_total_tokens=st.limits.max_batch_total_tokens,
        max_batch_prefill_tokens=st.limits.max_batch_prefill_tokens,
        max_waiting_tokens=c.max_waiting_tokens,
        max_active_adapters=st.limits.max_active_adapters,
        max_lora_rank=st.limits.max_lora_rank,
        default_adapter_source=c.default_adapter_source,
        adapter_id=c.adapter_id,
        preloaded_adapter_ids=list(c.preloaded_adapter_ids),
        # drafts per step as the engine runs them (LoRAX reports its resolved value too)
        speculative_tokens=st.aengine.engine.speculative_tokens
        if has_default_speculator(st.aengine.engine)
        else 0,
        version=__version__,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (loraserve_* and LoRAX's lorax_*); JSON for `Accept: application/json`",
)
async def metrics(request: Request, format: str | None = None) -> Response:
    """Prometheus text, or LoRAX's JSON form when `?format=json` or the Accept header asks for
    it: lorax-client's `metrics(format="json")` sends `Accept: application/json` and parses JSON."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from loraserve.server.metrics_lorax import wants_json

    m = get_state(request).metrics
    if wants_json(format, request.headers.get("accept")):
        return JSONResponse(m.render_json())
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
