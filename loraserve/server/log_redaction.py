"""Keep credentials out of the server's logs, whatever library writes the record.

Our own code never logs tokens, but third-party clients do at debug level
(botocore logs signed `Authorization` headers, HTTP clients log headers).
`install_redaction()` puts a filter on every root handler that rewrites each
record's final message: the values of the credential environment variables
the server was started with, and anything shaped like a bearer token, an AWS
signature credential or a Hugging Face token, become `***`.
"""

from __future__ import annotations

import logging
import os
import re

SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "PREDIBASE_API_TOKEN",
)

_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s'\",;]+"),
    re.compile(r"(?i)(credential=)[^\s'\",;/]+"),
    re.compile(
        r"(?i)((?:api[_-]?token|x-amz-security-token|authorization|token)['\"]?\s*[:=]\s*['\"]?)[^\s'\",;]+"
    ),
    re.compile(r"()\bhf_[A-Za-z0-9]{20,}\b"),
)
MASK = "***"


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        for pattern in _PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        clean = self.redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def make_redactor(extra_secrets: list[str | None] | None = None) -> RedactingFilter:
    """The credentials the server was started with (environment and `extra_secrets`)."""
    secrets = [os.environ.get(name) or "" for name in SECRET_ENV_VARS]
    secrets += [s for s in extra_secrets or [] if s]
    return RedactingFilter(secrets)


def install_redaction(
    extra_secrets: list[str | None] | None = None, redactor: RedactingFilter | None = None
) -> RedactingFilter:
    """Filter every handler of the root logger (and uvicorn's, which do not propagate)."""
    redactor = redactor or make_redactor(extra_secrets)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(redactor)
    return redactor
