"""Operators: Argon2id passwords, TOTP, lockout, and the admin API they log in to."""

from __future__ import annotations

import base64
import unicodedata
from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from fastapi.testclient import TestClient

from api.app import create_admin_app, create_app
from kms.clock import FixedClock
from kms.errors import InvalidRequest, Unauthenticated
from kms.models import Operator
from kms.passwords import Argon2Parameters, Passwords
from kms.service import Kms, KmsOptions
from tests.conftest import T0

FAST = Argon2Parameters(time_cost=1, memory_kib=8 * 1024, parallelism=1)
PASSWORD = "correct horse battery staple"
_users = iter(range(10_000))


def make_kms(kms, clock, params=FAST, max_failures=5) -> Kms:  # type: ignore[no-untyped-def]
    return Kms(db=kms.db, hsm=kms.hsm, clock=clock,
               options=KmsOptions(argon2=params, operator_max_failures=max_failures))


@pytest.fixture
def env(kms):  # type: ignore[no-untyped-def]
    clock = FixedClock(T0)
    k = make_kms(kms, clock)
    admin = TestClient(create_admin_app(kms_settings(kms), k), raise_server_exceptions=False)
    tenant_api = TestClient(create_app(kms_settings(kms), k), raise_server_exceptions=False)
    return k, clock, admin, tenant_api


def kms_settings(kms):  # type: ignore[no-untyped-def]
    from kms.config import Settings

    return Settings(max_request_bytes=64 * 1024)


def new_operator(k: Kms, password: str = PASSWORD) -> tuple[str, pyotp.TOTP]:
    username = f"op-{next(_users)}"
    created = k.operators.create(username, password)
    assert created.totp_uri.startswith("otpauth://totp/")
    seed = parse_qs(urlparse(created.totp_uri).query)["secret"][0]
    return username, pyotp.TOTP(seed)


def code(totp: pyotp.TOTP, clock: FixedClock) -> str:
    return totp.at(clock.now())


def login(admin: TestClient, username: str, password: str, otp: str):  # type: ignore[no-untyped-def]
    return admin.post("/admin/v1/login", json={"username": username, "password": password,
                                               "totp": otp})


def test_default_profile_is_rfc9106_low_memory() -> None:
    """t=3, 64 MiB, p=4, 16-byte salt; two hashes of one password differ."""
    pw = Passwords()
    h1, h2 = pw.hash(PASSWORD), pw.hash(PASSWORD)
    assert h1.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    salt_b64 = h1.split("$")[4]
    assert len(base64.b64decode(salt_b64 + "=" * (-len(salt_b64) % 4))) == 16
    assert h1 != h2 and pw.verify(h1, PASSWORD) and pw.verify(h2, PASSWORD)
    assert not pw.verify(h1, PASSWORD + "x")


def test_password_policy_and_nfc() -> None:
    pw = Passwords(FAST)
    with pytest.raises(InvalidRequest):
        pw.hash("short-11chr")
    long = "é" * 1024
    assert pw.verify(pw.hash(long), long)
    decomposed = unicodedata.normalize("NFD", "mot de passe très sûr")
    composed = unicodedata.normalize("NFC", decomposed)
    assert decomposed != composed
    assert pw.verify(pw.hash(decomposed), composed)


def test_login_success_gives_a_session_for_the_admin_api_only(env) -> None:  # type: ignore[no-untyped-def]
    k, clock, admin, tenant_api = env
    user, totp = new_operator(k)
    r = login(admin, user, PASSWORD, code(totp, clock))
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert r.json()["expires_at"] == (clock.now() + timedelta(minutes=15)).isoformat()
    h = {"Authorization": f"Bearer {token}"}
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 200
    refused = tenant_api.get("/v1/tenant", headers=h)
    assert refused.status_code == 401 and refused.json()["code"] == "unauthenticated"
    clock.advance(timedelta(minutes=15))
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 401
    with k.db.read() as s:
        assert PASSWORD not in s.get(Operator, user).password_hash


def test_tenant_tokens_are_refused_by_the_admin_api(env, new_tenant) -> None:  # type: ignore[no-untyped-def]
    _, _, admin, _ = env
    t = new_tenant()
    for role in ("tenant-admin", "hypervisor", "app"):
        r = admin.get("/admin/v1/tenants", headers=t.auth(role))
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"


def test_every_failure_answers_the_same_401(env) -> None:  # type: ignore[no-untyped-def]
    """Wrong password, wrong TOTP, replayed TOTP, unknown user, corrupted hash: one
    identical answer, never a 500."""
    k, clock, admin, _ = env
    user, totp = new_operator(k)
    corrupt, ctotp = new_operator(k)
    with k.db.write() as s:
        s.get(Operator, corrupt).password_hash = "$argon2id$v=19$m=65536,t=3,p=4$garbage"
    good = login(admin, user, PASSWORD, code(totp, clock))
    assert good.status_code == 200
    answers = [
        login(admin, user, "wrong password!!", code(totp, clock)),
        login(admin, user, PASSWORD, "000000" if code(totp, clock) != "000000" else "111111"),
        login(admin, user, PASSWORD, code(totp, clock)),  # replay of the step just used
        login(admin, "nobody-here", PASSWORD, code(totp, clock)),
        login(admin, corrupt, PASSWORD, code(ctotp, clock)),
        login(admin, user, PASSWORD, "12ab56"),
    ]
    bodies = {r.text for r in answers}
    assert all(r.status_code == 401 for r in answers), [r.status_code for r in answers]
    assert len(bodies) == 1, bodies


def test_lockout_after_configured_failures_and_unlock(env) -> None:  # type: ignore[no-untyped-def]
    k, clock, admin, _ = env
    user, totp = new_operator(k)
    for _ in range(5):
        assert login(admin, user, "not the password", code(totp, clock)).status_code == 401
    assert k.operators.status(user) == {"username": user, "locked": True, "failed_attempts": 5}
    clock.advance(timedelta(seconds=30))
    assert login(admin, user, PASSWORD, code(totp, clock)).status_code == 401  # locked
    k.operators.unlock(user)
    clock.advance(timedelta(seconds=30))
    assert login(admin, user, PASSWORD, code(totp, clock)).status_code == 200
    assert k.operators.status(user)["failed_attempts"] == 0
    trail = [(e["action"], e["outcome"]) for e in k.audit_export()
             if e["object"].startswith(f"operator:{user}")]
    assert trail.count(("operator.login", "failure")) == 6
    assert ("operator.lock", "success") in trail and ("operator.unlock", "success") in trail
    assert trail[-1] == ("operator.login", "success")


def test_lockout_threshold_is_configurable(kms) -> None:  # type: ignore[no-untyped-def]
    clock = FixedClock(T0)
    k = make_kms(kms, clock, max_failures=2)
    user, totp = new_operator(k)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            k.operators.login(user, PASSWORD, "999999" if code(totp, clock) != "999999" else "1")
    assert k.operators.status(user)["locked"]


def test_changed_parameters_upgrade_the_hash_on_login(kms) -> None:  # type: ignore[no-untyped-def]
    clock = FixedClock(T0)
    old = make_kms(kms, clock, params=FAST)
    user, totp = new_operator(old)
    with old.db.read() as s:
        before = s.get(Operator, user).password_hash
    assert "$m=8192,t=1,p=1$" in before
    newer = make_kms(kms, clock, params=Argon2Parameters(time_cost=2, memory_kib=16 * 1024,
                                                         parallelism=2))
    newer.operators.login(user, PASSWORD, code(totp, clock))
    with old.db.read() as s:
        after = s.get(Operator, user).password_hash
    assert "$m=16384,t=2,p=2$" in after and after != before
    clock.advance(timedelta(seconds=30))
    newer.operators.login(user, PASSWORD, code(totp, clock))  # the new hash verifies


def test_login_failure_says_login_failed_and_sessions_end_with_passwd_or_lockout(env) -> None:  # type: ignore[no-untyped-def]
    k, clock, admin, _ = env
    user, totp = new_operator(k)
    bad = login(admin, user, "wrong password!!", code(totp, clock))
    assert bad.status_code == 401 and bad.json()["code"] == "login_failed"
    ok = login(admin, user, PASSWORD, code(totp, clock))
    assert ok.headers["cache-control"] == "no-store"
    h = {"Authorization": f"Bearer {ok.json()['token']}"}
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 200
    k.operators.set_password(user, "a brand new passphrase")
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 401
    clock.advance(timedelta(seconds=30))
    h = {"Authorization": "Bearer " + login(admin, user, "a brand new passphrase",
                                            code(totp, clock)).json()["token"]}
    for _ in range(5):
        login(admin, user, "wrong password!!", code(totp, clock))
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 401


def test_passwd_changes_the_password(env) -> None:  # type: ignore[no-untyped-def]
    k, clock, admin, _ = env
    user, totp = new_operator(k)
    k.operators.set_password(user, "another long passphrase")
    assert login(admin, user, PASSWORD, code(totp, clock)).status_code == 401
    assert login(admin, user, "another long passphrase", code(totp, clock)).status_code == 200


def test_admin_api_runs_the_operator_actions(env) -> None:  # type: ignore[no-untyped-def]
    k, clock, admin, tenant_api = env
    user, totp = new_operator(k)
    h = {"Authorization": "Bearer " + login(admin, user, PASSWORD, code(totp, clock)).json()["token"]}
    t = admin.post("/admin/v1/tenants", json={"name": f"via admin {user}"}, headers=h)
    assert t.status_code == 201, t.text
    tid = t.json()["id"]
    p = admin.post(f"/admin/v1/tenants/{tid}/principals", json={"role": "app", "name": "a1"},
                   headers=h)
    assert p.status_code == 201 and p.headers["cache-control"] == "no-store"
    app_h = {"Authorization": f"Bearer {p.json()['token']}"}
    assert tenant_api.get("/v1/tenant", headers=app_h).json()["status"] == "active"
    incompatible = admin.post(f"/admin/v1/tenants/{tid}/principals",
                              json={"role": "tenant-admin", "name": "a1"}, headers=h)
    assert incompatible.status_code == 400 and incompatible.json()["code"] == "incompatible_roles"
    access = admin.get(f"/admin/v1/access?tenant={tid}", headers=h).json()["access"]
    assert {(r["resource"], r["role"]) for r in access} == {(f"tenant:{tid}", "app")}
    n = admin.post(f"/admin/v1/tenants/{tid}/offboard", json={}, headers=h)
    assert n.status_code == 201 and n.json()["effective_at"]
    assert admin.get(f"/admin/v1/tenants/{tid}/notice", headers=h).json()["public_key_pem"]
    assert tenant_api.get("/v1/tenant", headers=app_h).json()["status"] == "notice"
    assert admin.post(f"/admin/v1/tenants/{tid}/cancel-offboard", headers=h).json()["status"] \
        == "active"
    assert admin.post(f"/admin/v1/tenants/{tid}/suspend", headers=h).json()["status"] \
        == "suspended"
    assert tenant_api.get("/v1/tenant", headers=app_h).status_code == 403
    assert admin.post(f"/admin/v1/tenants/{tid}/resume", headers=h).json()["status"] == "active"
    assert admin.delete(f"/admin/v1/principals/{p.json()['id']}", headers=h).status_code == 200
    assert tenant_api.get("/v1/tenant", headers=app_h).status_code == 401
    assert admin.get("/admin/v1/erasures", headers=h).status_code == 200
    assert admin.get(f"/admin/v1/tenants/{tid}/certificate", headers=h).status_code == 404
    assert admin.post("/admin/v1/logout", headers=h).status_code == 204
    assert admin.get("/admin/v1/tenants", headers=h).status_code == 401


def test_failed_logins_do_not_hold_the_database_write_lock(kms) -> None:  # type: ignore[no-untyped-def]
    """While a login's Argon2 check runs, other writers go on (the break-it trial stalled
    the tenant API with a few threads of wrong passwords)."""
    import threading
    import time

    clock = FixedClock(T0)
    k = make_kms(kms, clock)
    user, totp = new_operator(k)
    entered, release = threading.Event(), threading.Event()
    real_verify = k.operators._passwords.verify

    def slow_verify(stored: str, password: str) -> bool:
        entered.set()
        release.wait(10)
        return real_verify(stored, password)

    k.operators._passwords.verify = slow_verify  # type: ignore[method-assign]
    t = threading.Thread(target=lambda: pytest.raises(Unauthenticated, k.operators.login,
                                                      user, "wrong password!!", "000000"))
    t.start()
    assert entered.wait(10)
    started = time.monotonic()
    k.tenants.create(f"written during a login {user}")  # needs the write lock
    elapsed = time.monotonic() - started
    release.set()
    t.join()
    assert elapsed < 2.0, elapsed


def test_admin_api_checks_the_session_before_the_body_and_never_redirects(env) -> None:  # type: ignore[no-untyped-def]
    """As on the tenant API: without a valid session, a bad body is 401 (not the 400
    naming its field); a trailing slash is a 404 problem, not a 307 to the Host header.
    Login itself takes no session: its bad bodies stay 400."""
    k, clock, admin, _tenant_api = env
    for headers in ({}, {"Authorization": "Bearer os-nobody.secret"}):
        for body in ({"name": 5}, {"name": "x", "extra": 1}):
            r = admin.post("/admin/v1/tenants", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text
    r = admin.post("/admin/v1/login", json={"username": 5})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
    user, totp = new_operator(k)
    token = login(admin, user, PASSWORD, code(totp, clock)).json()["token"]
    h = {"Authorization": f"Bearer {token}"}
    r = admin.post("/admin/v1/tenants", json={"name": 5}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "name"
    r = admin.get("/admin/v1/tenants/", headers={**h, "host": "evil.example"},
                  follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    r = admin.post("/admin/v1/tenants", content=b'{"name": "a", "name": "b"}',
                   headers={**h, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request"
