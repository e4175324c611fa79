"""The HTTP ceiling: a bare endpoint on the service's own server stack.

Same uvicorn configuration (`cli.serve._config`: h11, asyncio loop, access log on, the
service's JSON log formatter), same FastAPI version, an `async` route (as the service's
are: no thread-pool hop) that reads the bearer header and parses the same pydantic body
shape as `POST /v1/keys/{name}/encrypt` — and answers a constant. No middleware, no
database, no token, no crypto. A variant beside it tells what a thread-pool hop costs:
the same as a plain `def` route. Run:

    python -m bench.bare --port 18500 [--tls-cert F --tls-key F] [--log-file F]
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from api.app import TELEMETRY_OFF
from api.responses import Json
from api.strict_json import StrictJsonRoute


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Item(_Strict):
    plaintext: str
    context: str | None = None


class Body(_Strict):
    plaintext: str | None = None
    context: str | None = None
    batch: list[Item] | None = None


CONSTANT = {"ciphertext": "kms:v1:" + "A" * 1392, "key_version": 1}


def create_bare_app() -> FastAPI:
    # FastAPI configured as the service configures it (telemetry off: api.app).
    app = FastAPI(title="bare", docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry=TELEMETRY_OFF)

    @app.post("/v1/keys/{name}/encrypt")
    async def encrypt(name: str, body: Body, request: Request) -> dict[str, Any]:
        """The ceiling: what the stack costs for this request shape."""
        request.headers.get("authorization", "")
        return CONSTANT

    @app.post("/v1/sync/keys/{name}/encrypt")
    def encrypt_sync(name: str, body: Body, request: Request) -> dict[str, Any]:
        """The same as a `def` route, which FastAPI runs in its thread pool."""
        request.headers.get("authorization", "")
        return CONSTANT

    # The same once more, through the service's route class and its answer type: a
    # well-formed request is called directly, without FastAPI's dependency resolution,
    # as the data plane's are (api.strict_json): the stricter ceiling.
    direct = APIRouter(route_class=StrictJsonRoute)

    @direct.post("/v1/direct/keys/{name}/encrypt")
    async def encrypt_direct(name: str, body: Body, request: Request) -> Response:
        request.headers.get("authorization", "")
        return Json(CONSTANT)

    app.include_router(direct)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def add_probe_routes(app: FastAPI) -> None:
    """Two routes put first in the service's own app, for `bench.inproc floor`: the bare
    route's work behind the service's middleware, exception handlers and routing table;
    and the same after authenticating through the service's inline call."""
    from starlette.responses import JSONResponse

    from api.tenant_routes import as_caller

    async def noop(name: str, body: Body, request: Request) -> JSONResponse:
        request.headers.get("authorization", "")
        return JSONResponse(CONSTANT)

    async def auth_only(name: str, body: Body, request: Request) -> Any:
        return await as_caller(request, lambda _kms, _caller: JSONResponse(CONSTANT))

    app.router.add_api_route("/v1/bench-noop/{name}/encrypt", noop, methods=["POST"])
    app.router.add_api_route("/v1/bench-auth/{name}/encrypt", auth_only, methods=["POST"])
    routes = app.router.routes
    routes[0:0] = [routes.pop(), routes.pop()]  # first, as the data plane's routes are


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--log-file")
    parser.add_argument("--with-service", action="store_true",
                        help="also build the service (KMS_HOME) and its apps in this "
                             "process, idle: the bare route then runs in a process of the "
                             "service's size")
    parser.add_argument("--service-app", action="store_true",
                        help="serve the service's own tenant app (KMS_HOME) with the probe "
                             "routes of add_probe_routes first, instead of the bare app")
    parser.add_argument("--journal-handoffs-only", action="store_true",
                        help="with --service-app: the journal's writer writes nothing, while "
                             "its group commit (wake-ups, futures, the writer thread) runs "
                             "as in the service: what the hand-offs cost without the "
                             "writer's own work (a measurement, never a configuration)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("bench.bare listens on loopback only")
    from cli.logs import configure_logging
    from cli.serve import _config, _Server
    from cli.tls import server_context

    configure_logging("INFO", args.log_file)
    tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    held: list[Any] = []
    app: Any = create_bare_app()
    if args.with_service or args.service_app:
        from api.app import create_admin_app, create_app
        from cli.wiring import build_kms
        from kms.config import load_settings

        settings = load_settings(None)
        kms = build_kms(settings)
        kms.self_test()
        held += [kms, create_app(settings, kms), create_admin_app(settings, kms)]
        if args.service_app:
            app = held[1]
            add_probe_routes(app)
            if args.journal_handoffs_only:
                kms.audit.append_direct = (  # type: ignore[method-assign]
                    lambda _db, events: [None] * len(events))
    server = _Server(_config(app, args.host, args.port, tls))
    import gc

    gc.collect()
    gc.freeze()  # as `kms serve` does
    import signal

    def _exit(_signum: int, _frame: Any) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)
    asyncio.run(server.serve())


if __name__ == "__main__":
    main()
