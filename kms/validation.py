"""Validation of identifiers and tenant names (DESIGN.md, CLI contract)."""

from __future__ import annotations

import re
import unicodedata

from kms.errors import InvalidRequest

_IDENTIFIER = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_TENANT_NAME = 200


def check_identifier(value: str, *, field: str) -> str:
    """Return `value` if it is an opaque identifier of 1-128 characters from
    [A-Za-z0-9._:-]; raise InvalidRequest otherwise."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or value in (".", ".."):
        raise InvalidRequest(f"{field} must be 1-128 characters from [A-Za-z0-9._:-]",
                             field=field)
    return value


def normalize_tenant_name(name: str) -> tuple[str, str]:
    """Return (display name in NFC, uniqueness key = NFC + case folding + NFC).

    Refuses empty names, control or format characters, surrogates, and leading or
    trailing white space."""
    if not isinstance(name, str):
        raise InvalidRequest("tenant name must be a string", field="name")
    display = unicodedata.normalize("NFC", name)
    if not display or not display.strip():
        raise InvalidRequest("tenant name must not be empty", field="name")
    if display != display.strip():
        raise InvalidRequest("tenant name must not start or end with spaces", field="name")
    if len(display) > MAX_TENANT_NAME:
        raise InvalidRequest(f"tenant name longer than {MAX_TENANT_NAME} characters",
                             field="name")
    for ch in display:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise InvalidRequest("tenant name contains a control character", field="name")
    key = unicodedata.normalize("NFC", display.casefold())
    return display, key
