"""Errors in each API's own body and status.

OpenAI:    {"error": {"message", "type", "param", "code"}}
Anthropic: {"type": "error", "error": {"type", "message"}}
Which one a response uses follows the path: /v1/messages... is Anthropic's, the rest OpenAI's.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from pellucid.errors import PellucidError

# status -> (OpenAI type, Anthropic type)
_TYPES = {
    400: ("invalid_request_error", "invalid_request_error"),
    401: ("invalid_request_error", "authentication_error"),
    404: ("invalid_request_error", "not_found_error"),
    405: ("invalid_request_error", "invalid_request_error"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "invalid_request_error"),
    429: ("rate_limit_error", "rate_limit_error"),
    500: ("server_error", "api_error"),
    503: ("server_error", "overloaded_error"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_pellucid(cls, e: PellucidError, *, rename: dict[str, str] | None = None) -> ApiError:
        param, message = e.param, e.message
        if param is not None and rename:
            head = param.split(".")[0].split("[")[0]
            if head in rename:
                param = rename[head] + param[len(head) :]
                if " " not in head and message.startswith(head):  # "max_tokens = -1 ..." names the client's field
                    message = rename[head] + message[len(head) :]
        return cls(e.status, message, param=param, code=e.code)


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(e: ApiError, anthropic: bool) -> dict[str, Any]:
    oa_type, an_type = _TYPES.get(e.status, ("server_error" if e.status >= 500 else "invalid_request_error", "api_error"))
    message, param = _printable(e.message), _printable(e.param)
    if anthropic:
        return {"type": "error", "error": {"type": an_type, "message": message}}
    return {"error": {"message": message, "type": oa_type, "param": param, "code": e.code}}


def _printable(s: str | None) -> str | None:
    """Text that can be sent as UTF-8: a client's unpaired surrogates (echoed in a field path) as escapes."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(s, str) else s


def error_response(e: ApiError, path: str) -> JSONResponse:
    headers = {"retry-after": "1"} if e.status in (429, 503) else None
    return JSONResponse(error_body(e, is_anthropic(path)), status_code=e.status, headers=headers)


def from_validation(e: ValidationError, *, rename: dict[str, str] | None = None) -> ApiError:
    """The first pydantic error as a 400 naming the field."""
    err = e.errors()[0]
    param = _loc(err.get("loc", ()))
    if param and rename and param.split(".")[0] in rename:
        head = param.split(".")[0]
        param = rename[head] + param[len(head) :]
    kind = err.get("type", "")
    got = err.get("input")
    if kind == "extra_forbidden":
        msg = f"{param}: pellucid does not support this parameter"
    elif kind == "missing":
        msg = f"{param}: this field is required"
    else:
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = f"{param}: {err.get('msg', 'invalid value')} (got {shown})"
    return ApiError(400, msg, param=param)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|union\[.*\]|[A-Z]\w*)$")


def _loc(loc) -> str | None:
    """pydantic's error location as a field path ("messages[0].role"), without union branch tags."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif not _TYPE_TAG.match(str(x)):
            out += f".{x}" if out else str(x)
    return out or None
