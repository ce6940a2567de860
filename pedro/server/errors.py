"""APIError: every refusal the server makes, rendered as OpenAI's error JSON with the right HTTP status.

Raising one from anywhere (handlers, the registry, the backend) ends the request with
``{"error": {"message", "type", "param", "code"}}``, which the official clients turn into their typed exceptions
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

from typing import Mapping, Optional

from fastapi.responses import JSONResponse

from pedro.server.schemas import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
# What the client sees for a failure inside the server: no exception names, paths or values.
INTERNAL_ERROR = "The server had an error while processing your request; it has been logged."


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status: a client error (4xx) is never typed server_error."""
    return _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")


class APIError(Exception):
    """``APIError(status, message[, param], code=..., retry_after=..., headers=...)``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        *,
        code: Optional[str] = None,
        retry_after: Optional[int] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after
        self.headers = dict(headers or {})

    def __reduce__(self) -> tuple:
        """Pickle with every field: on Ray Serve an APIError raised in an engine replica reaches the ingress."""
        return (_rebuild, (self.status, self.message, self.code, self.param, self.retry_after, self.headers))

    @property
    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=error_type(self.status), param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers or None)


def _rebuild(
    status: int,
    message: str,
    code: Optional[str],
    param: Optional[str],
    retry_after: Optional[int],
    headers: Optional[dict] = None,
) -> APIError:
    return APIError(status, message, code=code, param=param, retry_after=retry_after, headers=headers)


def internal_error() -> APIError:
    return APIError(500, INTERNAL_ERROR, code="internal_error")


def not_found(name: str) -> APIError:
    """The same answer whether ``name`` does not exist or belongs to another tenant, so names do not leak."""
    return APIError(404, f"The model or adapter {name!r} does not exist", code="model_not_found", param="model")
