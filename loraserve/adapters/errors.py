"""Adapter failures that the server reports to the caller as 4xx errors."""


class AdapterError(ValueError):
    """The adapter cannot be served (bad files, wrong shapes, unsupported type).

    Messages are shown to callers, so they must never contain tokens or keys.
    """

    status_code = 400


class AdapterNotFoundError(AdapterError):
    status_code = 404


class AdapterAuthError(AdapterError):
    """Missing or rejected credentials for a private adapter."""

    status_code = 401


class AdapterForbiddenError(AdapterAuthError):
    status_code = 403
