"""Every error the server sends, in one JSON shape: ``{"error": {"message", "type", "param"}}``.

``param`` names the request field at fault (``prompt``, ``messages[1].content``, ``max_tokens``...) or is
null when no field is; ``type`` follows the OpenAI API's error types, so its clients show the message.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
OVERLOADED = "overloaded_error"
SERVER_ERROR = "server_error"
CONFLICT = "conflict_error"


class ApiError(Exception):
    """A request the server refuses or could not answer; raised anywhere a handler runs."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, type: str = INVALID_REQUEST):
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param}}
    return JSONResponse(body, status_code=error.status)


def install_error_handlers(app: FastAPI) -> None:
    """ApiError as itself; Starlette's own errors (unknown path, wrong method) in the same shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = NOT_FOUND if exc.status_code == 404 else INVALID_REQUEST
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(message, None, exc.status_code, kind))
