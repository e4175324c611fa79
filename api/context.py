"""Per-request audit context: request id (X-Request-Id if well formed, else a new one),
source address; the auth dependencies fill in the actor."""

from __future__ import annotations

import re
from typing import Any

from kms.audit import AuditContext, audit_context

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestContext:
    """Pure ASGI middleware; echoes the request id in the response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", []):
            if name.lower() == b"x-request-id":
                given = value.decode("latin-1")
        client = scope.get("client")
        ctx = AuditContext(source=client[0] if client else "unknown", actor="anonymous")
        if _REQUEST_ID.fullmatch(given):
            ctx.request_id = given

        async def with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (b"x-request-id", ctx.request_id.encode())]
            await send(message)

        with audit_context(ctx):
            await self.app(scope, receive, with_id)
