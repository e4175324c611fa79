"""Dependencies shared by both apps: the Kms, and the bearer token of a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kms.errors import Unauthenticated
from kms.service import Kms


# Trivial dependencies are `async def`: FastAPI would run a plain `def` in the thread
# pool, one thread hop per dependency per request.
async def get_kms(request: Request) -> Kms:
    kms: Kms = request.app.state.kms
    return kms


KmsDep = Annotated[Kms, Depends(get_kms)]


async def bearer_token(request: Request) -> str:
    """The token of `Authorization: Bearer …`; Unauthenticated when absent."""
    return bearer(request)


def bearer(request: Request) -> str:
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        # One credential per request (RFC 9110: a singleton field). With two, a proxy
        # that checks the last and a service that uses the first would disagree.
        raise Unauthenticated("more than one Authorization header")
    scheme, _, token = (values[0] if values else "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing bearer token")
    return token.strip()


TokenDep = Annotated[str, Depends(bearer_token)]
