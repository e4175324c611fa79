"""Refuse request bodies over a size limit before they are read whole (413)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from api.problems import language, problem

Scope = dict[str, Any]


class _TooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parser lets it through as a 413."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class BodySizeLimit:
    """Pure ASGI middleware: bodies are JSON (415 otherwise) and no larger than the limit
    (413), checked from Content-Length up front and by counting streamed bytes."""

    def __init__(self, app: Any, *, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_type = accept_language = None
        chunked = False
        for key, value in scope.get("headers", ()):
            name = key.lower()
            if name == b"content-length":
                declared = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"accept-language":
                accept_language = value.decode("latin-1")

        def refuse(code: str) -> Any:
            return problem(code, language(accept_language))(scope, receive, send)

        if declared is not None:
            if not declared.isdigit():
                await refuse("invalid_request")
                return
            if int(declared) > self.max_bytes:
                await refuse("payload_too_large")
                return
        has_body = (declared not in (None, "0")) or chunked
        media_type = (content_type or "").split(";")[0].strip().lower()
        if has_body and scope.get("method") in ("POST", "PUT", "PATCH") \
                and media_type != "application/json":
            await refuse("unsupported_media_type")
            return
        seen = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await refuse("payload_too_large")
