"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("decodekit.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error the client sees as an OpenAI error body with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_value(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def param_of(message: str, renames: dict[str, str] | None = None) -> str | None:
    """The parameter a ``ValueError`` message starts with (``"top_p must be ..."``), in API names."""
    first = message.split(" ", 1)[0].strip(":,")
    if not first.isidentifier():
        return None
    return (renames or {}).get(first, first)


def install(app: FastAPI) -> None:
    """Route every failure through the OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        message = f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        return APIError(exc.status_code, str(message), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", "-")
        log.exception("unhandled error on %s (request id %s)", request.url.path, request_id)
        return APIError(500, f"internal server error (request id {request_id}; see the server log)").response()


def validation_error(errors) -> APIError:
    """422 for malformed JSON or wrong types, naming the first offending field."""
    if not errors:
        return APIError(422, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(422, f"request body is not valid JSON: {detail}", code="json_invalid")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return APIError(422, "request body must be a JSON object (Content-Type: application/json)",
                        code="invalid_body")
    param = ".".join(loc) or None
    where = f" at '{param}'" if param else ""
    return APIError(422, f"{first.get('msg', 'invalid value')}{where}", param=param, code=first.get("type"))
