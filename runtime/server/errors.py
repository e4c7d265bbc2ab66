"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """Raised anywhere while serving a request; the app turns it into the matching JSON response."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        # Whatever client text a message quotes, the error itself must encode (no 500 from a 400).
        message, param = (_encodable(v) for v in (self.message, self.param))
        return {"error": {"message": message, "type": kind, "param": param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _encodable(text: str | None) -> str | None:
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def handle_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (wrong method), in the same shape as ours."""
    return APIError(exc.status_code, exc.detail, headers=exc.headers).response()


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after this, so the traceback reaches the log; the client gets no internals.
    return APIError(500, "internal server error", code="internal_error").response()
