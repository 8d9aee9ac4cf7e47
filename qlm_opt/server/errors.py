"""HTTP-facing errors and their OpenAI-style bodies.

Routes and dependencies raise ``APIError``; one exception handler (``app.py``) turns it, the
project's ``QLMError``, FastAPI's ``RequestValidationError`` and Starlette's ``HTTPException``
into ``{"error": {"message", "type", "param", "code"}}`` with the right status.
"""

from __future__ import annotations

import json

from qlm_opt.errors import QLMError

# status -> OpenAI error type
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(QLMError):
    """An error answered to the client with ``status`` and an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_body(
    message: str, type: str, param: str | None = None, code: str | int | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    t = ERROR_TYPES.get(status, "invalid_request_error")
    return json.dumps(error_body(message, t, param, code)).encode()
