"""End to end: end of contract ("End of contract" point 4) with the real `kms` command, a
real `kms serve` process, the real `faketime`, `pkcs11-tool`, `qemu-img` and `openssl`.

Scenario (built once by the `scenario` fixture, checked by the tests below, in order):

1. fresh KMS_HOME (own token, PINs, database); tenant A (offboarded) and tenant B
   (bystander) with their principals, created with the CLI;
2. over HTTP: A creates two volumes, formats a QEMU LUKS image with volume key 1 and
   writes a pattern in it, creates app key "k1" and encrypts bytes; B creates a volume;
3. `kms tenant offboard A`: a 21-day notice, signed, in French and English; during the
   notice A's existing keys keep working and nothing new can be created (409);
4. `faketime <now + 22 days> kms erasure run` erases A, and only A;
5.–7. afterwards A's tokens answer 401, no key of A is given any more, the token holds no
   object of A, while B still works and the LUKS image still opens with the key saved in
   step 2 (so it is the key's destruction alone that makes the image unreadable);
8. the erasure certificate verifies with OpenSSL and `kms erasure verify`, a tampered
   copy does not;
9. last: the server's output holds none of the secrets handled here.

The module owns its KMS_HOME: it never touches ./var nor the token of the rest of the
test session. The helpers it shares with test_e2e_luks.py live in tests/e2e_support.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

# Before the import below, so that pytest rewrites the asserts in the shared helpers too.
pytest.register_assert_rewrite("tests.e2e_support")

from tests.e2e_support import (
    Passphrase,
    SecretLog,
    Server,
    b64,
    create_volume,
    fetch_volume_key,
    image_opts,
    init_home,
    issue_tokens,
    kms_env,
    kms_proc,
    leaked_form,
    luks_create,
    qemu,
    requires_tools,
    run_kms,
    start_server,
    stopped_log,
    unb64,
)

pytestmark = [
    pytest.mark.e2e,
    requires_tools("qemu-img", "qemu-io", "faketime", "pkcs11-tool", "openssl",
                   install="qemu-utils faketime opensc openssl"),
]

TOKEN_LABEL = "kms"
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
NOTICE_PERIOD = timedelta(days=21)
PATTERN = "0x5c"

# Every secret that crosses this module; the last test looks for each of them in the
# server's output.
SECRETS = SecretLog()


# -- helpers of this module ----------------------------------------------------------------

def openssl_verify(pub: Path, sig: Path, doc: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                           str(sig), str(doc)], capture_output=True, text=True, timeout=30)


def softhsm_module() -> str:
    for candidate in SOFTHSM_MODULES:
        if os.path.exists(candidate):
            return candidate
    pytest.skip("SoftHSM2 module not found")


def token_objects(home: Path) -> str:
    """`pkcs11-tool -O` on this module's token, logged in; the PIN goes by environment."""
    env = kms_env(home)
    env["KMS_TEST_PIN"] = (home / "secrets" / "user.pin").read_text().strip()
    proc = subprocess.run(["pkcs11-tool", "--module", softhsm_module(), "--token-label",
                           TOKEN_LABEL, "--login", "--pin", "env:KMS_TEST_PIN", "-O"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"pkcs11-tool -O failed: {proc.stderr.strip()}"
    return proc.stdout


def problem_code(r: httpx.Response) -> str | None:
    assert r.headers.get("content-type", "").startswith("application/problem+json"), r.text
    code: str | None = r.json().get("code")
    return code


def read_pattern(img: Path, key: bytes, workdir: Path) -> subprocess.CompletedProcess[str]:
    with Passphrase(workdir, key) as secret:
        return qemu("qemu-io", "--object", secret, "--image-opts", image_opts(img),
                    "-c", f"read -P {PATTERN} 0 1M", check=False)


# -- the scenario -----------------------------------------------------------------------

@dataclass
class Scenario:
    home: Path
    server: Server
    workdir: Path                     # mode 0700: image, certificate, keys' temp files
    a_id: str = ""
    b_id: str = ""
    a_tokens: dict[str, str] = field(default_factory=dict)   # role -> bearer token
    b_token: str = ""                                        # B's hypervisor
    a_volumes: tuple[str, str] = ("a-vol-1", "a-vol-2")
    b_volume: str = "b-vol-1"
    a_key1: bytes = b""               # saved in step 2: in memory only
    b_key1: bytes = b""
    image: Path = Path()
    plaintext: bytes = b""
    ciphertext: str = ""
    objects_before: str = ""          # pkcs11-tool -O before the notice
    notice: dict[str, Any] = field(default_factory=dict)      # `kms tenant offboard` output
    during: dict[str, httpx.Response] = field(default_factory=dict)
    erasure_proc: subprocess.CompletedProcess[str] | None = None
    fake_now: datetime | None = None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    # 1. Fresh home, token, `kms init`, two tenants and their principals.
    home = tmp_path_factory.mktemp("e2e-offboard-home")
    init_home(home, SECRETS)

    tenant_a = run_kms(home, "tenant", "create", "Offboarded SA")
    tenant_b = run_kms(home, "tenant", "create", "Bystander SAS")
    assert tenant_a["status"] == tenant_b["status"] == "active"
    a_tokens = issue_tokens(home, tenant_a["id"], ("hypervisor", "app", "tenant-admin"),
                            name_prefix="a", label="A bearer token", secrets=SECRETS)
    b_tokens = issue_tokens(home, tenant_b["id"], ("hypervisor",), name_prefix="b",
                            label="B bearer token", secrets=SECRETS)

    workdir = tmp_path_factory.mktemp("e2e-offboard-work")
    workdir.chmod(0o700)
    server = start_server(home, workdir / "server.log")
    sc = Scenario(home=home, server=server, workdir=workdir, a_id=tenant_a["id"],
                  b_id=tenant_b["id"], a_tokens=a_tokens, b_token=b_tokens["hypervisor"])
    try:
        _use_before_notice(sc)
        sc.objects_before = token_objects(home)
        _serve_notice_and_use(sc)
        _run_erasure_in_22_days(sc)
        yield sc
    finally:
        server.stop()


def _use_before_notice(sc: Scenario) -> None:
    """2. A: two volumes, a LUKS image with key 1, app key k1 and a ciphertext; B: a volume."""
    with sc.server.client(sc.a_tokens["hypervisor"]) as hv:
        for vol in sc.a_volumes:
            r = create_volume(hv, vol)
            assert r.status_code == 201, r.text
        sc.a_key1 = fetch_volume_key(hv, sc.a_volumes[0], SECRETS)

    sc.image = sc.workdir / "a-vol-1.luks"
    with Passphrase(sc.workdir, sc.a_key1) as secret:
        luks_create(sc.image, secret)
        out = qemu("qemu-io", "--object", secret, "--image-opts", image_opts(sc.image),
                   "-c", f"write -P {PATTERN} 0 1M")
        assert "wrote 1048576/1048576 bytes" in out.stdout
    assert sc.image.read_bytes()[:6] == b"LUKS\xba\xbe"
    assert b"\x5c" * 4096 not in sc.image.read_bytes(), "the pattern is stored in clear"

    with sc.server.client(sc.a_tokens["tenant-admin"]) as admin:
        r = admin.post("/v1/keys", json={"name": "k1"})
        assert r.status_code == 201, r.text
    sc.plaintext = os.urandom(48)
    SECRETS.remember("A plaintext", sc.plaintext)
    with sc.server.client(sc.a_tokens["app"]) as app:
        r = app.post("/v1/keys/k1/encrypt", json={"plaintext": b64(sc.plaintext)})
        assert r.status_code == 200, r.text
        sc.ciphertext = r.json()["ciphertext"]
        assert sc.ciphertext.startswith("kms:v1:")

    with sc.server.client(sc.b_token) as hv_b:
        r = create_volume(hv_b, sc.b_volume)
        assert r.status_code == 201, r.text
        sc.b_key1 = fetch_volume_key(hv_b, sc.b_volume, SECRETS)


def _serve_notice_and_use(sc: Scenario) -> None:
    """3. Serve the notice with the CLI, then use the API during the notice."""
    sc.notice = run_kms(sc.home, "tenant", "offboard", sc.a_id, "--yes")
    d = sc.during
    with sc.server.client(sc.a_tokens["tenant-admin"]) as admin:
        d["tenant"] = admin.get("/v1/tenant")
        d["notice"] = admin.get("/v1/tenant/notice")
        d["create_key"] = admin.post("/v1/keys", json={"name": "k2"})
    with sc.server.client(sc.a_tokens["hypervisor"]) as hv:
        d["volume_key"] = hv.post(f"/v1/volumes/{sc.a_volumes[0]}/key")
        d["create_volume"] = create_volume(hv, "a-vol-3")
    with sc.server.client(sc.a_tokens["app"]) as app:
        d["decrypt"] = app.post("/v1/keys/k1/decrypt", json={"ciphertext": sc.ciphertext})
        d["encrypt"] = app.post("/v1/keys/k1/encrypt", json={"plaintext": b64(b"during notice")})


def _run_erasure_in_22_days(sc: Scenario) -> None:
    """4. The real faketime, 22 days ahead, runs `kms erasure run` once."""
    sc.fake_now = datetime.now(timezone.utc) + timedelta(days=22)
    stamp = sc.fake_now.strftime("%Y-%m-%d %H:%M:%S")
    sc.erasure_proc = kms_proc(sc.home, "erasure", "run", "--json", prefix=("faketime", stamp),
                               extra_env={"TZ": "UTC"})


# -- 3. the notice ----------------------------------------------------------------------

def parse_utc(text: str) -> datetime:
    instant = datetime.fromisoformat(text)
    assert instant.tzinfo is not None, f"naive timestamp {text!r}"
    return instant


def test_offboard_serves_a_21_day_notice(scenario: Scenario) -> None:
    n = scenario.notice
    assert set(n) >= {"id", "served_at", "effective_at", "algorithm", "document", "signature"}
    served, effective = parse_utc(n["served_at"]), parse_utc(n["effective_at"])
    assert effective - served == NOTICE_PERIOD
    assert abs(datetime.now(timezone.utc) - served) < timedelta(minutes=5)
    assert n["algorithm"] == "ECDSA-P256-SHA256"
    doc = json.loads(n["document"])
    assert doc["tenant"]["id"] == scenario.a_id and doc["notice_id"] == n["id"]


def test_tenant_sees_its_notice(scenario: Scenario) -> None:
    r = scenario.during["tenant"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == scenario.a_id and body["status"] == "notice"
    n = scenario.notice
    assert body["notice"] == {"id": n["id"], "served_at": n["served_at"],
                              "effective_at": n["effective_at"]}


def test_notice_is_signed_and_bilingual(scenario: Scenario) -> None:
    r = scenario.during["notice"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"document", "signature", "public_key_pem"}
    assert body["document"] == scenario.notice["document"]
    work = scenario.workdir
    (work / "notice.json").write_bytes(body["document"].encode("utf-8"))
    (work / "notice.sig").write_bytes(unb64(body["signature"]))
    (work / "notice-pub.pem").write_text(body["public_key_pem"])
    ok = openssl_verify(work / "notice-pub.pem", work / "notice.sig", work / "notice.json")
    assert ok.returncode == 0 and "Verified OK" in ok.stdout, ok.stdout + ok.stderr

    doc = json.loads(body["document"])
    assert doc["effective_at"] == scenario.notice["effective_at"]
    assert doc["scope"]["volumes"] == 2 and doc["scope"]["application_keys"] == 1
    assert isinstance(doc["fr"], dict) and isinstance(doc["en"], dict)
    assert "Destruction des clés" in doc["fr"]["methode"]
    assert "Destruction of the encryption keys" in doc["en"]["method"]

    # One byte changed: OpenSSL refuses it (the check above can fail).
    tampered = body["document"].replace('"volumes":2', '"volumes":3', 1).encode("utf-8")
    assert tampered != body["document"].encode("utf-8")
    (work / "notice-bad.json").write_bytes(tampered)
    bad = openssl_verify(work / "notice-pub.pem", work / "notice.sig", work / "notice-bad.json")
    assert bad.returncode != 0 and "Verified OK" not in bad.stdout


def test_existing_keys_keep_working_during_notice(scenario: Scenario) -> None:
    d = scenario.during
    r = d["volume_key"]
    assert r.status_code == 200, r.text
    assert unb64(r.json()["key"]) == scenario.a_key1
    r = d["decrypt"]
    assert r.status_code == 200, r.text
    assert unb64(r.json()["plaintext"]) == scenario.plaintext
    r = d["encrypt"]
    assert r.status_code == 200, r.text
    assert r.json()["ciphertext"].startswith("kms:v1:") and r.json()["key_version"] == 1


def test_nothing_new_during_notice(scenario: Scenario) -> None:
    for name in ("create_volume", "create_key"):
        r = scenario.during[name]
        assert r.status_code == 409, f"{name}: {r.status_code} {r.text}"
        assert problem_code(r) == "tenant_in_notice", f"{name}: {r.text}"


# -- 4. the erasure run -----------------------------------------------------------------

def test_erasure_run_22_days_later_erases_a_only(scenario: Scenario) -> None:
    proc = scenario.erasure_proc
    assert proc is not None
    assert proc.returncode == 0, f"kms erasure run: {proc.stderr.strip()}"
    outcomes = json.loads(proc.stdout)
    states = {o["tenant_id"]: o["state"] for o in outcomes}
    assert states.get(scenario.a_id) == "erased", outcomes
    assert states.get(scenario.b_id) != "erased", outcomes
    assert all(o["error"] is None for o in outcomes), outcomes

    shown_a = run_kms(scenario.home, "tenant", "show", scenario.a_id)
    assert shown_a["status"] == "erased" and shown_a["principals"] == []
    shown_b = run_kms(scenario.home, "tenant", "show", scenario.b_id)
    assert shown_b["status"] == "active" and len(shown_b["principals"]) == 1


# -- 5.–7. after the erasure, against the same running server ---------------------------

def test_a_tokens_are_rejected(scenario: Scenario) -> None:
    assert scenario.server.alive()
    for role, token in scenario.a_tokens.items():
        with scenario.server.client(token) as c:
            r = c.get("/v1/tenant")
            assert r.status_code == 401, f"{role} GET /v1/tenant: {r.status_code} {r.text}"
            assert problem_code(r) == "unauthenticated"
            for vol in scenario.a_volumes:
                r = c.post(f"/v1/volumes/{vol}/key")
                assert r.status_code == 401, f"{role} key {vol}: {r.status_code} {r.text}"
                assert "key" not in r.json()


def test_b_is_untouched(scenario: Scenario) -> None:
    with scenario.server.client(scenario.b_token) as hv_b:
        assert hv_b.get("/v1/tenant").json()["status"] == "active"
        assert fetch_volume_key(hv_b, scenario.b_volume, SECRETS) == scenario.b_key1


def test_token_holds_no_object_of_a(scenario: Scenario) -> None:
    a_prefix, b_prefix = f"kms/{scenario.a_id}/", f"kms/{scenario.b_id}/"
    # The listing shows A's KEK before the erasure: the check below is not vacuous.
    assert f"{a_prefix}kek/1" in scenario.objects_before, scenario.objects_before
    listing = token_objects(scenario.home)
    leftovers = [line for line in listing.splitlines() if a_prefix in line]
    assert not leftovers, f"objects of A remain in the token: {leftovers}"
    assert "kms/service/" in listing and f"{b_prefix}kek/1" in listing, listing


def test_luks_image_unreadable_but_intact(scenario: Scenario) -> None:
    # No key can be had from the service any more (401 above, no key in the answer).
    with scenario.server.client(scenario.a_tokens["hypervisor"]) as hv:
        r = hv.post(f"/v1/volumes/{scenario.a_volumes[0]}/key")
        assert r.status_code == 401 and "key" not in r.json()
    # Another key (B's) does not open the image ...
    wrong = read_pattern(scenario.image, scenario.b_key1, scenario.workdir)
    assert wrong.returncode != 0 and "Invalid password" in wrong.stdout + wrong.stderr
    # ... while the key saved before the erasure still does: the image is intact, only the
    # destruction of its key makes it unreadable.
    ok = read_pattern(scenario.image, scenario.a_key1, scenario.workdir)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "read 1048576/1048576 bytes" in ok.stdout
    assert "Pattern verification failed" not in ok.stdout + ok.stderr
    assert not list(scenario.workdir.glob("pass-*")), "a passphrase file was left behind"


# -- 8. the certificate -------------------------------------------------------------------

def test_erasure_certificate_verifies_with_openssl(scenario: Scenario) -> None:
    work = scenario.workdir
    cert = work / "cert.json"
    out = run_kms(scenario.home, "erasure", "certificate", scenario.a_id, "-o", str(cert))
    assert out == {"certificate": str(cert), "signature": f"{cert}.sig"}
    pem = kms_proc(scenario.home, "service", "public-key")
    assert pem.returncode == 0, pem.stderr
    pub = work / "pub.pem"
    pub.write_text(pem.stdout)
    assert pem.stdout.strip() == scenario.during["notice"].json()["public_key_pem"].strip()

    ok = openssl_verify(pub, Path(f"{cert}.sig"), cert)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout, ok.stdout + ok.stderr
    verified = kms_proc(scenario.home, "erasure", "verify", str(cert))
    assert verified.returncode == 0, verified.stderr

    doc = json.loads(cert.read_bytes())
    assert doc["tenant"]["id"] == scenario.a_id
    assert doc["notice"]["id"] == scenario.notice["id"]
    assert doc["notice"]["document_digest"] == "sha256:" + hashlib.sha256(
        scenario.notice["document"].encode("utf-8")).hexdigest()
    assert doc["destroyed_objects"], doc
    assert doc["deleted_rows"]["volumes"] == 2, doc["deleted_rows"]
    assert doc["deleted_rows"]["principals"] == 3, doc["deleted_rows"]
    assert doc["deleted_rows"]["app_keys"] == 1, doc["deleted_rows"]
    assert doc["absence_check"]["result"] == "no object found"
    assert doc["token"]["model"] == "SoftHSM v2" and doc["token"]["label"] == TOKEN_LABEL
    assert "destruction of the encryption keys" in doc["erasure"]["method"]["en"]
    # Certified at the (faked) erasure time, after the notice's effective date.
    certified = parse_utc(doc["erasure"]["certified_at"])
    assert certified >= parse_utc(scenario.notice["effective_at"])

    # One byte changed: both OpenSSL and `kms erasure verify` refuse it.
    data = bytearray(cert.read_bytes())
    at = data.index(b'"volumes":2') + len(b'"volumes":')
    data[at] = ord("3")
    bad = work / "cert-bad.json"
    bad.write_bytes(bytes(data))
    shutil.copyfile(f"{cert}.sig", f"{bad}.sig")
    refused = openssl_verify(pub, Path(f"{bad}.sig"), bad)
    assert refused.returncode != 0 and "Verified OK" not in refused.stdout
    refused_kms = kms_proc(scenario.home, "erasure", "verify", str(bad))
    assert refused_kms.returncode != 0, refused_kms.stdout
    assert "signature does not verify" in refused_kms.stderr


# -- 9. nothing secret in the server's output (keep this test last) ------------------------

def test_zz_server_log_holds_no_secret(scenario: Scenario) -> None:
    log = stopped_log(scenario.server)
    secrets = SECRETS.by_value()
    assert any(kind.startswith("A bearer") for kind in secrets.values())
    assert any(kind == f"volume key {scenario.a_volumes[0]}" for kind in secrets.values())
    leaks = [kind for secret, kind in secrets.items()
             if leaked_form(secret, log) is not None]
    assert not leaks, f"found in the server's output: {leaks}"
