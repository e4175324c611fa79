"""Application factories: the tenant API and the admin API, two apps on two ports.

Nothing is built at import time; the composition root passes settings and the Kms.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.telemetry import TelemetryConfig
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from api.context import RequestContext
from api.deps import bearer
from api.problems import from_error, language, problem
from kms.config import Settings
from kms.errors import KeyIntegrityError, KmsError
from kms.service import Kms

log = logging.getLogger("kms.api")


def create_app(settings: Settings, kms: Kms) -> FastAPI:
    """The tenant API (tenant principals only)."""
    from api.tenant_routes import authenticate, router

    def credentials(request: Request) -> None:
        authenticate(kms, bearer(request))  # as the routes do

    app = _base_app("Tenant KMS — API locataire", settings, kms, openapi="/v1/openapi.json",
                    credentials=credentials)
    _add_routes(app, router)
    return app


def create_admin_app(settings: Settings, kms: Kms) -> FastAPI:
    """The admin API (the provider's operators only), served on its own port."""
    from api.admin_routes import authenticate_operator, login, router

    def credentials(request: Request) -> None:
        if request.scope.get("endpoint") is not login:  # the one route without a session
            authenticate_operator(bearer(request), kms)  # as OperatorDep does

    app = _base_app("Tenant KMS — API d'administration", settings, kms,
                    openapi="/admin/v1/openapi.json", credentials=credentials)
    _add_routes(app, router)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """The router's routes on the app's own router, first and in their order. FastAPI's
    `include_router` (0.165) keeps the router as a nested branch that every request
    matches twice and walks again for its version: about a seventh of an encrypt's CPU in
    process. The routes carry their full paths (the router's prefix) and no dependency
    of the router, so they are the same routes either way."""
    assert not router.dependencies and not router.tags
    app.router.routes[0:0] = list(router.routes)


# FastAPI (0.165) reports to any OpenTelemetry provider configured in the process (and
# adds OTLP exporters when FASTAPI_OTEL_AUTO_CONFIGURE=true): spans, metrics, and log
# records of validation failures and unhandled exceptions with their messages and
# stack traces, with the request and its body at hand for processors. A KMS sends
# nothing out that it has not chosen to: off. (It also saves the per-request check for
# a provider, about 4 us of CPU.)
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False,
                                  "operation_spans": False, "auto_configure": False}


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _base_app(title: str, settings: Settings, kms: Kms, *, openapi: str,
              credentials: Callable[[Request], None]) -> FastAPI:
    # No redirect for a trailing slash: Starlette's would point at the Host header's name,
    # and a client that follows it would resend its body (plaintext) there. A 404 instead.
    app = FastAPI(title=title, version="1", docs_url=None, redoc_url=None, openapi_url=openapi,
                  redirect_slashes=False, telemetry=TELEMETRY_OFF)
    app.state.kms = kms
    app.state.settings = settings
    app.add_middleware(RequestContext, max_bytes=settings.max_request_bytes)
    _install_problem_handlers(app, credentials)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        checks = kms.ready()
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "unavailable", **checks},
                            status_code=200 if ok else 503,
                            headers={} if ok else {"Retry-After": "1"})

    return app


def _install_problem_handlers(app: FastAPI, credentials: Callable[[Request], None]) -> None:
    def lang_of(request: Request) -> str:
        return language(request.headers.get("accept-language"))

    @app.exception_handler(KmsError)
    async def _domain_error(request: Request, exc: KmsError) -> Response:
        if isinstance(exc, KeyIntegrityError):
            log.error("key integrity failure", extra={"path": request.url.path})
        return from_error(exc, lang_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI validates the body before the route authenticates: without valid
        # credentials the answer is theirs (401), not the body's (a 400 naming a field).
        try:
            await run_in_threadpool(credentials, request)
        except KmsError as refused:
            return from_error(refused, lang_of(request))
        # Never echo the input: it may be plaintext. Name the first bad field only.
        errors: list[Any] = list(exc.errors())
        field = None
        if errors and errors[0].get("type") != "json_invalid":  # its loc is an offset
            # Item positions included: "batch.1.plaintext", as the service's own checks say.
            # An unknown field's name comes from the input: named only when it looks like a
            # field name (a second break-it trial had a card number echoed as one).
            loc = [str(p) if isinstance(p, int) or _FIELD_NAME.fullmatch(str(p)) else "…"
                   for p in errors[0].get("loc", ()) if p != "body"]
            field = ".".join(loc) or None
        return problem("invalid_request", lang_of(request), field=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # A body FastAPI could not parse (bad UTF-8, nesting, huge numbers): as for any
            # bad body, credentials first (a second break-it trial's finding).
            try:
                await run_in_threadpool(credentials, request)
            except KmsError as refused:
                return from_error(refused, lang_of(request))
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(exc.status_code, "invalid_request")
        response = problem(code, lang_of(request))
        if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # The type only: an exception message could carry data.
        log.error("unhandled error %s", type(exc).__name__, extra={"path": request.url.path})
        return problem("internal_error", lang_of(request))
