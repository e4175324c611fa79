"""Request bodies parsed strictly: a JSON object with a duplicate key is refused.

RFC 8259 leaves duplicate names to the parser; Python's keeps the last one. A proxy or
firewall that keeps the first would then have read another request than the one the
service acts on, so a duplicate is a malformed body (400 `invalid_request`, nothing
changed). Routes get it through `StrictJsonRoute`, their router's `route_class`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # FastAPI reports a JSONDecodeError as a malformed body (json_invalid).
        raise json.JSONDecodeError("duplicate key in a JSON object", "", 0)
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def loads(body: bytes | str) -> Any:
    return _DECODER.decode(body.decode() if isinstance(body, bytes) else body)


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_strict_json"):
            self._strict_json = loads(await self.body())
        return self._strict_json


_NO_BODY = [{"type": "extra_forbidden", "loc": ("body",), "msg": "this route takes no body",
             "input": None}]


async def _has_body(request: Request) -> bool:
    """Whether the request carries a non-empty body (Content-Length is digits: checked
    by the middleware); a chunked one is read to tell (bounded by the body limit)."""
    length = request.headers.get("content-length")
    if length is not None:
        return int(length) != 0
    if "transfer-encoding" in request.headers:
        return bool(await request.body())
    return False


class StrictJsonRoute(APIRoute):
    """FastAPI reads a JSON body with `await request.json()`: hand it a request whose
    `json()` refuses duplicate keys (the same parser otherwise, at the same cost). A route
    that takes no body refuses one (FastAPI would ignore it, and act): a malformed
    request changes nothing."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            if not takes_body and await _has_body(request):
                # Answered as any bad body is (app.py): credentials first, then a 400.
                raise RequestValidationError(_NO_BODY)
            return await handler(_StrictJsonRequest(request.scope, request.receive))

        return strict
