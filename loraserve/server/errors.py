"""LoRAX's error contract: `{"error", "error_type"}` with the status codes `lorax-client` maps to exceptions."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraserve.adapters.errors import AdapterError


class ApiError(Exception):
    """An error the caller should see verbatim; raised anywhere below the routes."""

    def __init__(
        self,
        message: str,
        status_code: int = 422,
        error_type: str = "validation",
        *,
        openai_status: int | None = None,
        openai_error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        # Where OpenAI's contract differs from LoRAX's (an unknown `model` is OpenAI's 404, LoRAX's
        # loader answers 424), the `/v1` routes answer with these instead.
        self.openai_status = openai_status
        self.openai_error_type = openai_error_type

    def status_for(self, path: str) -> tuple[int, str]:
        """(status, error_type) for a request to `path`: `/v1` routes keep OpenAI's where it differs."""
        if path.startswith("/v1/") and self.openai_status is not None:
            return self.openai_status, self.openai_error_type or self.error_type
        return self.status_code, self.error_type

    def to_dict(self) -> dict[str, str]:
        """LoRAX's flat body, message prefixed as LoRAX's router prefixes it (see `lorax_message`)."""
        return {"error": lorax_message(self.message, self.error_type), "error_type": self.error_type}


#: LoRAX's router formats its `InferError`s with these prefixes (router/src/infer.rs); clients and
#: log scrapers written against LoRAX match on them, so the LoRAX routes send them too.
LORAX_PREFIXES = {
    "validation": "Input validation error: ",
    "generation": "Request failed during generation: ",
}


def lorax_message(message: str, error_type: str) -> str:
    """`message` as LoRAX's REST routes send it: prefixed by its kind, never twice.

    OpenAI routes keep the bare message inside OpenAI's nested error object.
    """
    prefix = LORAX_PREFIXES.get(error_type, "")
    if not prefix or message.startswith(prefix):
        return message
    return prefix + message


def validation_error(message: str) -> ApiError:
    return ApiError(message, 422, "validation")


def not_supported(what: str) -> ApiError:
    """Parameters a later release implements are refused loudly instead of being ignored."""
    return ApiError(f"{what} is not supported yet by this server", 422, "validation")


def generation_error(message: str) -> ApiError:
    return ApiError(message, 424, "generation")


def internal_error() -> ApiError:
    """A bug, not the request's fault: the details go to the log, never to the client."""
    return ApiError("internal server error", 500, "internal")


def overloaded_error() -> ApiError:
    return ApiError("Model is overloaded", 429, "overloaded")


#: Adapter statuses that mean "this adapter does not exist or cannot be loaded" (unknown, bad
#: files, a Predibase version still training, an unexpected load failure). LoRAX's loader answers
#: all of them as a generation error, 424, so `lorax-client` raises GenerationError.
ADAPTER_LOAD_FAILURES = frozenset({400, 404, 500, 502, 503, 504})
#: A source that did not answer (502-504) may well answer a retry: those 424s say so.
RETRYABLE = frozenset({502, 503, 504})


def adapter_api_error(exc: AdapterError) -> ApiError:
    """An adapter problem as the caller sees it.

    * Not found or failed to load (`ADAPTER_LOAD_FAILURES`): 424 `generation` on LoRAX's routes,
      as LoRAX answers; the `/v1` routes keep the adapter's own status (404 for an unknown
      `model`, OpenAI's `NotFoundError`), type `validation`.
      An unreachable source (502-504) is a failed load too, as LoRAX's loader has it, with a
      `Retry-After` header (the source may answer a retry); `/v1` keeps its 503.
    * Refused credentials (401/403) keep their status everywhere: a caller must be able to tell a
      bad token from a missing adapter. So do merge problems (422). `error_type` is `validation`
      so `lorax-client` raises its ValidationError.
    """
    status = int(getattr(exc, "status_code", 400))
    message = f"adapter error: {exc}"
    if status in ADAPTER_LOAD_FAILURES:
        headers = {"Retry-After": "1"} if status in RETRYABLE else None
        return ApiError(
            message, 424, "generation", openai_status=status, openai_error_type="validation", headers=headers
        )
    return ApiError(message, status, "validation")


def _field_path(loc: tuple) -> str:
    # FastAPI prefixes body fields with "body"; the caller only cares about the field itself.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def request_validation_message(exc: RequestValidationError) -> str:
    msgs = []
    for err in exc.errors():
        msgs.append(f"`{_field_path(tuple(err.get('loc', ())))}`: {err.get('msg', 'invalid value')}")
    return "; ".join(msgs) or "invalid request"


def error_response(
    request: Request, message: str, error_type: str, status_code: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """LoRAX's flat shape, except on `/v1`, where OpenAI clients read `error.message`.

    The `/v1` body keeps a top-level `error_type` so both kinds of callers find what they look for.
    """
    if request.url.path.startswith("/v1/"):
        body = {
            "error": {"message": message, "type": error_type, "param": None, "code": status_code},
            "error_type": error_type,
        }
        return JSONResponse(body, status_code=status_code, headers=headers)
    return JSONResponse(
        {"error": lorax_message(message, error_type), "error_type": error_type},
        status_code=status_code,
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        status, error_type = exc.status_for(request.url.path)
        return error_response(request, exc.message, error_type, status, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return await _api_error(request, adapter_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Like LoRAX's axum router: unparsable JSON is a 400, a well-formed body with bad fields a 422.
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return error_response(
                request,
                f"request body is not valid JSON ({request_validation_message(exc)})",
                "bad_request",
                400,
            )
        return error_response(request, request_validation_message(exc), "validation", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = "validation" if exc.status_code in (400, 422) else "http"
        return error_response(request, str(exc.detail), error_type, exc.status_code)
