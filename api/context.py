"""The one ASGI middleware in front of both apps: the request's audit context, and the
body checks. Pure ASGI and a single layer: it runs on every request, so the headers are
read in one pass and `send`/`receive` are wrapped once.

- Audit context: request id (X-Request-Id if well formed, else a new one, echoed in the
  response) and source address; the route's authentication fills in the actor.
- Bodies are JSON (415 otherwise) and no larger than the limit (413), checked from
  Content-Length before anything is read and by counting streamed bytes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from starlette.exceptions import HTTPException

from api.problems import language, problem
from kms.audit import AuditContext, enter_audit_context, leave_audit_context

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_WITH_BODY = ("POST", "PUT", "PATCH")
LARGE_BODY = 256 * 1024
LARGE_BODIES_AT_ONCE = 2


class _TooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parser lets it through as a 413."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class RequestContext:
    def __init__(self, app: Any, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self._large_gate: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = declared = content_type = accept_language = None
        chunked = False
        for key, value in scope.get("headers", ()):
            name = key.lower()
            if name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"accept-language":
                accept_language = value.decode("latin-1")
        client = scope.get("client")
        ctx = AuditContext(source=client[0] if client else "unknown", actor="anonymous")
        if given is not None and _REQUEST_ID.fullmatch(given):
            ctx.request_id = given
        request_id = ctx.request_id.encode()
        started = False

        async def send_with_id(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()),
                                      (b"x-request-id", request_id)]
            await send(message)

        def refuse(code: str) -> Any:
            return problem(code, language(accept_language))(scope, receive, send_with_id)

        if b"%2f" in scope.get("raw_path", b"").lower():
            # An encoded slash would be decoded into a path separator before routing: an
            # identifier never holds one, and a proxy filtering the raw path would see
            # another route than the one taken.
            await refuse("invalid_request")
            return
        if declared is not None:
            if not declared.isdigit():
                await refuse("invalid_request")
                return
            if int(declared) > self.max_bytes:
                await refuse("payload_too_large")
                return
        if ((declared not in (None, "0")) or chunked) and scope.get("method") in _WITH_BODY \
                and (content_type or "").split(";")[0].strip().lower() != "application/json":
            await refuse("unsupported_media_type")
            return
        seen = 0

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        context_token = enter_audit_context(ctx)  # audit_context(), without contextlib
        try:
            try:
                if declared is not None and int(declared) > LARGE_BODY:
                    # Large bodies (batches) are read and worked on a few at a time: the
                    # work is CPU-bound on one core, so more at once only holds more
                    # megabytes in memory (and the collector busy); the rest wait in
                    # their sockets' buffers.
                    async with self._large():
                        await self.app(scope, limited_receive, send_with_id)
                else:
                    await self.app(scope, limited_receive, send_with_id)
            except _TooLarge:
                if not started:
                    await refuse("payload_too_large")
        finally:
            leave_audit_context(context_token)

    def _large(self) -> asyncio.Semaphore:
        # One per event loop (asyncio primitives belong to the loop that first uses them).
        loop = asyncio.get_running_loop()
        if self._large_gate is None or self._large_gate[0] is not loop:
            self._large_gate = (loop, asyncio.Semaphore(LARGE_BODIES_AT_ONCE))
        return self._large_gate[1]
