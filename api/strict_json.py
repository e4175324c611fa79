"""Request bodies parsed strictly: a JSON object with a duplicate key is refused.

RFC 8259 leaves duplicate names to the parser; Python's keeps the last one. A proxy or
firewall that keeps the first would then have read another request than the one the
service acts on, so a duplicate is a malformed body (400 `invalid_request`, nothing
changed). Routes get it through `StrictJsonRoute`, their router's `route_class`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


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
    request changes nothing.

    A route whose endpoint takes only string path parameters, at most one body model and
    the `Request`, and answers a `Response` (the data plane's), is called directly when
    its request is well formed: a JSON body of `application/json` that its model
    accepts. FastAPI's handler then adds nothing but its cost (a fifth of an encrypt's
    CPU in process: dependency resolution over four empty parameter kinds, the
    content type parsed by `email.message`). Anything else (another content type, a body
    that does not parse or validate, a missing parameter) goes to FastAPI's handler, on
    the same request and its read body, so every refusal is FastAPI's own; a property
    test holds the two paths to the same answers."""

    fast_path = True

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None
        direct = self._direct(handler) if self.fast_path else None
        inner = direct or handler

        async def strict(request: Request) -> Response:
            if not takes_body and await _has_body(request):
                # Answered as any bad body is (app.py): credentials first, then a 400.
                raise RequestValidationError(_NO_BODY)
            return await inner(_StrictJsonRequest(request.scope, request.receive))

        return strict

    def _direct(self, handler: Handler) -> Handler | None:
        d = self.dependant
        call = d.call
        if (call is None or not inspect.iscoroutinefunction(call) or d.dependencies
                or d.query_params or d.header_params or d.cookie_params
                or d.request_param_name is None or d.websocket_param_name
                or d.http_connection_param_name or d.response_param_name
                or d.background_tasks_param_name or d.security_scopes_param_name
                or len(d.body_params) > 1
                or any(p.field_info.annotation is not str or p.alias != p.name
                       for p in d.path_params)
                or inspect.signature(call).return_annotation not in (Response, "Response")):
            return None
        model: type[BaseModel] | None = None
        body_name = ""
        if d.body_params:
            field = d.body_params[0]
            annotation = field.field_info.annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model, body_name = annotation, field.name
        paths = tuple(p.name for p in d.path_params)
        request_name = d.request_param_name

        async def direct(request: Request) -> Response:
            values: dict[str, Any] = {request_name: request}
            params = request.path_params
            for name in paths:
                value = params.get(name)
                if not isinstance(value, str):
                    return await handler(request)
                values[name] = value
            if model is not None:
                if request.headers.get("content-type") != "application/json":
                    return await handler(request)
                try:
                    values[body_name] = model.model_validate(await request.json())
                except HTTPException:  # a body too large (api.context): as FastAPI does
                    raise
                except Exception:  # noqa: BLE001 - FastAPI's handler says what was wrong
                    return await handler(request)
            response: Response = await call(**values)
            return response

        return direct
