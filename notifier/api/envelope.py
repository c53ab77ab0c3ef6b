"""The ``{data, errors, warnings}`` envelope, and the one place errors become status codes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from notifier.errors import (
    AuthenticationFailed,
    DestinationNotAllowed,
    InvalidInput,
    InvalidRows,
    NotFound,
    NotifierError,
    TooLarge,
    TransientError,
)
from notifier.faults import summary

__all__ = ["envelope", "error_body", "install_error_handlers"]

log = logging.getLogger(__name__)

# The first class that matches decides; NotifierError last, as the catch-all of our own tree.
STATUSES: tuple[tuple[type[NotifierError], int, str], ...] = (
    (AuthenticationFailed, 401, "UNAUTHORIZED"),
    (NotFound, 404, "NOT_FOUND"),
    (TooLarge, 413, "TOO_LARGE"),
    (InvalidInput, 400, "INVALID_INPUT"),
    (DestinationNotAllowed, 400, "DESTINATION_NOT_ALLOWED"),
    (TransientError, 503, "UNAVAILABLE"),
    (NotifierError, 500, "INTERNAL"),
)


def envelope(data: Any, *, status: int = 200, warnings: list[str] | None = None,
             errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    return JSONResponse({"data": data, "errors": errors or None, "warnings": warnings or None},
                        status_code=status)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return body


def _status_of(exc: NotifierError) -> tuple[int, str]:
    return next((status, code) for kind, status, code in STATUSES if isinstance(exc, kind))


def install_error_handlers(app: FastAPI) -> None:
    async def notifier_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, NotifierError)
        status, code = _status_of(exc)
        if isinstance(exc, InvalidRows):  # bulk input: every bad line, by number
            errors = [error_body(code, f"line {line}: {problem}", f"line {line}")
                      for line, problem in exc.rows]
        elif isinstance(exc, TransientError):
            log.warning("%s %s: %s", request.method, request.url.path, exc)
            errors = [error_body(code, exc.public)]
        elif status >= 500:
            # Ours, not the caller's (a statement the database refused, a bug): its message
            # names tables and constraints and may quote values, so it is no answer to give.
            log.error("%s %s failed: %s", request.method, request.url.path, summary(exc))
            errors = [error_body(code, "notifier could not complete this request; its "
                                       "operator's log has the cause")]
        else:
            field = exc.field if isinstance(exc, InvalidInput) else None
            errors = [error_body(code, str(exc), field)]
        response = envelope(None, status=status, errors=errors)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer, Basic realm="notifier"'
        return response

    async def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = []
        for error in exc.errors():
            location = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
            field = ".".join(location) or "body"
            errors.append(error_body("INVALID_INPUT", f"{field}: {error.get('msg')}", field))
        return envelope(None, status=400, errors=errors)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return envelope(None, status=exc.status_code,
                        errors=[error_body("HTTP_" + str(exc.status_code), str(exc.detail))])

    app.add_exception_handler(NotifierError, notifier_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
