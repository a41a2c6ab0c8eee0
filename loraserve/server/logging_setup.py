"""How the server's log lines look: text for people, or (`--json-output`) exactly one JSON object
per line for log collectors.

JSON lines are written by python-json-logger rather than a `%`-format string that merely looks
like JSON: a message holding a quote, a backslash, a newline or a traceback would otherwise
break the line. Every logger goes through the one root handler set up here, uvicorn's too (in
JSON mode uvicorn gets no handlers of its own, so its error and access records propagate), and
Python warnings and uncaught exceptions are turned into log records, so nothing else reaches
the stream in another format.

Credentials are masked twice in JSON mode: the root handler's `RedactingFilter` rewrites the
message, and the formatter masks every other string it serializes (the exception text it
formats itself, extra fields) because those never pass through the filter.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from loraserve.server.log_redaction import RedactingFilter, make_redactor

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn adds an ANSI-coloured copy of some messages as an extra field: noise in JSON
_SKIPPED_EXTRAS = ("color_message",)
log = logging.getLogger("loraserve")


class RedactingJsonFormatter(JsonFormatter):
    """`{"time", "level", "logger", "message", ...extras, "exc_info"?}` with secrets masked."""

    def __init__(self, redactor: RedactingFilter) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, *_SKIPPED_EXTRAS],
        )
        self.redactor = redactor

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        # the time first, so a line reads like the text format
        log_data["time"] = datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
            timespec="milliseconds"
        )
        super().add_fields(log_data, record, message_dict)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {key: self._redact(value) for key, value in log_data.items()}

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redactor.redact(value)
        if isinstance(value, dict):
            return {k: self._redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._redact(v) for v in value]
        return value


def _log_uncaught_exceptions() -> None:
    """Python prints an uncaught exception's traceback as bare text; in JSON mode it becomes a record."""

    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.critical(
            "uncaught exception in thread %s",
            name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def make_handler(json_output: bool, redactor: RedactingFilter) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingJsonFormatter(redactor) if json_output else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(redactor)
    return handler


def setup_logging(
    level: str, json_output: bool = False, extra_secrets: Sequence[str | None] = ()
) -> RedactingFilter:
    """The root handler every logger writes through; returns its redactor so uvicorn's own handlers
    (text mode) can share it."""
    redactor = make_redactor(list(extra_secrets))
    logging.basicConfig(level=level.upper(), handlers=[make_handler(json_output, redactor)])
    if json_output:
        logging.captureWarnings(True)
        _log_uncaught_exceptions()
    return redactor


def uvicorn_log_config(json_output: bool) -> dict[str, Any] | None:
    """For `uvicorn.Config(log_config=...)`: in JSON mode none, so uvicorn installs no text handlers
    and its records reach the JSON root handler; otherwise uvicorn's own (coloured) format."""
    if json_output:
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
