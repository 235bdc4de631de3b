"""OpenAI error objects: every failure is `{"error": {message, type, param, code}}`.

Handlers installed by `install_error_handlers` turn pydantic validation errors (which FastAPI
would answer with its own 422 shape), engine parameter errors and unexpected exceptions into
that shape with OpenAI's status codes.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from server.engine.sampling_params import InvalidParamError

logger = logging.getLogger(__name__)

# Status nginx uses for "client closed request"; nobody reads it, the client is gone.
CLIENT_CLOSED = 499

# OpenAI's `type` per status (its own API uses these strings).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """Raised anywhere in a request handler; answered as an OpenAI error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)

    @property
    def headers(self) -> dict[str, str] | None:
        """Response headers beyond the JSON body (Retry-After on a 503 for overload)."""
        return None


class BadRequest(APIError):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message, status=400, param=param, code=code)


def error_body(
    message: str, status: int, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


async def send_error(
    send: Send,
    message: str,
    status: int,
    code: str | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> None:
    """An OpenAI error answered straight from an ASGI middleware (before any route runs)."""
    body = json.dumps(error_body(message, status, code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status)


def from_invalid_param(e: InvalidParamError) -> APIError:
    return BadRequest(str(e), param=e.param)


# ---------------------------------------------------------------------------------------------
# Pydantic error -> one message naming the parameter


def _is_union_tag(part: str | int) -> bool:
    """pydantic puts the union member it tried into `loc` ('str', 'list[int]', 'ChatMessage')."""
    if isinstance(part, int):
        return False
    return (
        "[" in part
        or "-" in part
        or part[:1].isupper()
        or part in {"str", "int", "float", "bool", "list", "dict", "none"}
    )


def format_loc(loc: tuple[str | int, ...]) -> str | None:
    """('body', 'messages', 0, 'str', 'role') -> 'messages[0].role'."""
    parts = [p for p in loc if not _is_union_tag(p)]
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 for pydantic's error list: the first offending parameter and what is wrong."""
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "") or detail.get("msg", "")
        return BadRequest(f"The request body is not valid JSON: {reason}")
    if not errors:
        return BadRequest("Invalid request")
    if errors[0].get("type") == "invalid_unicode":
        param = (errors[0].get("ctx") or {}).get("param")
        return BadRequest(str(errors[0].get("msg")), param=param)
    param = format_loc(tuple(errors[0].get("loc", ())))
    # Union failures give one error per member at the same place: join their messages.
    messages: list[str] = []
    for e in errors:
        where_e = format_loc(tuple(e.get("loc", ())))
        nested = (where_e or "").startswith((f"{param}[", f"{param}."))
        if param is not None and where_e != param and not nested:
            continue
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if where_e != param:  # a member deeper down, e.g. stop[1] of a list
            msg = f"{where_e}: {msg}"
        if msg not in messages:
            messages.append(msg)
    where = f"'{param}'" if param else "The request body"
    if param is None and errors[0].get("type") in ("model_attributes_type", "dict_type"):
        return BadRequest("The request body must be a JSON object")
    return BadRequest(f"Invalid value for {where}: {'; or '.join(messages)}", param=param)


# ---------------------------------------------------------------------------------------------
# Handlers


def _count_rejection(request: Request, err: APIError) -> None:
    """Counts a refused request on /metrics (see metrics.REJECTION_REASONS) by its error."""
    counter = getattr(request.app.state, "rejections", None)
    if counter is None:
        return
    reason = getattr(err, "reason", None)
    if reason is None:
        if err.code == "limit_exceeded":
            reason = "request_limit"
        elif err.status == 503:
            reason = "engine_unavailable"
        elif 400 <= err.status < 500 and err.status not in (408, CLIENT_CLOSED):
            reason = "invalid_request"
        else:
            return
    counter.inc(reason)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    _count_rejection(request, exc)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = validation_error(list(exc.errors()))
    _count_rejection(request, err)
    return JSONResponse(err.body(), status_code=err.status)


async def _invalid_param(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidParamError)
    err = from_invalid_param(exc)
    _count_rejection(request, err)
    return JSONResponse(err.body(), status_code=err.status)


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    if status == 404:
        message = "Not found: no such route"
    return JSONResponse(error_body(message, status), status_code=status, headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error while serving a request", exc_info=exc)
    body = error_body(f"Internal server error: {type(exc).__name__}: {exc}", 500)
    return JSONResponse(body, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(InvalidParamError, _invalid_param)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
