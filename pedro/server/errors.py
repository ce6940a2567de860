"""APIError: every refusal the server makes, rendered as OpenAI's error JSON with the right HTTP status.

Raising one from anywhere (handlers, the registry, the backend) ends the request with
``{"error": {"message", "type", "param", "code"}}``, which the official clients turn into their typed exceptions
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from pedro.server.schemas import ErrorBody, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: Optional[str] = None,
        param: Optional[str] = None,
        retry_after: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after

    def __reduce__(self) -> tuple:
        """Pickle with every field: on Ray Serve an APIError raised in an engine replica reaches the ingress."""
        return (_rebuild, (self.status, self.message, self.code, self.param, self.retry_after))

    @property
    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers)


def _rebuild(status: int, message: str, code: Optional[str], param: Optional[str], retry_after: Optional[int]) -> APIError:
    return APIError(status, message, code=code, param=param, retry_after=retry_after)


def not_found(name: str) -> APIError:
    """The same answer whether ``name`` does not exist or belongs to another tenant, so names do not leak."""
    return APIError(404, f"The model or adapter {name!r} does not exist", code="model_not_found", param="model")
