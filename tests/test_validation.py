"""Identifiers and tenant names (CLI contract)."""

from __future__ import annotations

import base64
import re
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from api.tenant_routes import _b64
from kms.errors import InvalidRequest
from kms.validation import check_identifier, normalize_tenant_name

ALLOWED = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@given(st.text(max_size=200))
def test_identifier_accepts_exactly_the_contract(value: str) -> None:
    """Anything outside [A-Za-z0-9._:-]{1,128} is refused; everything inside accepted."""
    if ALLOWED.fullmatch(value) and value not in (".", ".."):
        assert check_identifier(value, field="id") == value
    else:
        with pytest.raises(InvalidRequest):
            check_identifier(value, field="id")


@given(st.from_regex(ALLOWED, fullmatch=True).filter(lambda v: v not in (".", "..")))
def test_identifier_accepts_valid(value: str) -> None:
    assert check_identifier(value, field="id") == value


@pytest.mark.parametrize("dots", [".", ".."])
def test_dot_identifiers_are_refused(dots: str) -> None:
    """They would be normalised away in URL paths (the break-it trial created '..')."""
    with pytest.raises(InvalidRequest):
        check_identifier(dots, field="id")


@pytest.mark.parametrize("bad", ["", " ", " lead", "trail ", "a\nb", "a\x00b", "tab\there",
                                 "zero\u200bwidth", "x" * 201, "bidi\u202e"])
def test_bad_tenant_names_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_tenant_name(bad)


def test_tenant_name_uniqueness_key_folds_case_and_normalisation() -> None:
    composed = normalize_tenant_name("Société Générale")[1]
    decomposed = normalize_tenant_name(unicodedata.normalize("NFD", "SOCIÉTÉ GÉNÉRALE"))[1]
    assert composed == decomposed
    assert normalize_tenant_name("Straße")[1] == normalize_tenant_name("STRASSE")[1]


@given(st.text(min_size=1, max_size=50).filter(lambda s: s == s.strip() and s.strip()))
def test_tenant_name_key_is_idempotent(name: str) -> None:
    try:
        display, key = normalize_tenant_name(name)
    except InvalidRequest:
        return
    assert unicodedata.is_normalized("NFC", display)
    assert normalize_tenant_name(display)[1] == key


def test_duplicate_tenant_names_refused(kms) -> None:  # type: ignore[no-untyped-def]
    """Names equal after NFC and case folding are one tenant; nothing is created twice."""
    from kms.errors import AlreadyExists

    kms.tenants.create("Crème Brûlée SAS")
    before = len(kms.tenants.list())
    with pytest.raises(AlreadyExists):
        kms.tenants.create(unicodedata.normalize("NFD", "CRÈME BRÛLÉE sas"))
    assert len(kms.tenants.list()) == before


def test_command_line_overrides_win_over_the_environment_and_are_validated(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from kms.config import load_settings
    from kms.errors import InvalidConfiguration

    monkeypatch.setenv("KMS_PORT", "1111")
    assert load_settings(None).port == 1111
    s = load_settings(None, port=2222, home="/tmp/somewhere")
    assert s.port == 2222 and isinstance(s.home, Path)
    with pytest.raises(InvalidConfiguration):
        load_settings(None, port=70000)


@example("0000=")
@example("0000==")
@example("QR==")
@given(st.one_of(st.text(max_size=64), st.text(alphabet="ABCab+/=019 \n-_", max_size=64),
                 st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())))
def test_request_base64_is_exactly_the_standard_strict_form(value: str) -> None:
    """The API's base64 (pybase64, for speed) accepts exactly RFC 4648's standard form:
    the alphabet, in quanta of four, padding only to complete the last one, nothing
    after it (stricter than CPython 3.11's strict mode, which lets '0000=' through)."""
    rfc = re.fullmatch(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?",
                       value)
    expected = base64.b64decode(value) if rfc else None
    try:
        got: bytes | None = _b64(value, "plaintext")
    except InvalidRequest:
        got = None
    assert got == expected
