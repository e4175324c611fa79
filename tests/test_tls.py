"""TLS on both ports of a real `kms serve` (ANSSI TLS guide): 1.2 and 1.3 only, ECDHE with
AEAD suites, no compression, the certificate chains to the local CA; and where the two
APIs may listen."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from cli.serve import check_listen_policy
from kms.config import load_settings
from kms.errors import InvalidConfiguration
from tests.conftest import SETUP_TOKEN

KMS = str(Path(sys.executable).parent / "kms")
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env.update(KMS_HOME=str(home), SOFTHSM2_CONF=str(home / "softhsm" / "softhsm2.conf"),
               **extra)
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, int, int]]:  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("tls-home")
    subprocess.run([str(SETUP_TOKEN)], env=_env(home), check=True, capture_output=True)
    subprocess.run([KMS, "init"], env=_env(home), check=True, capture_output=True)
    port, admin = _free_port(), _free_port()
    log = open(home / "serve.log", "wb")
    proc = subprocess.Popen([KMS, "serve", "--port", str(port), "--admin-port", str(admin)],
                            env=_env(home), stdout=log, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(home / "tls" / "ca.pem"))
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", admin), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("kms serve did not start: "
                            + (home / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
    yield home, port, admin
    proc.terminate()
    proc.wait(timeout=15)
    log.close()


def s_client(port: int, *args: str, ca: Path | None = None) -> tuple[bool, str]:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
           *args]
    if ca is not None:
        cmd += ["-CAfile", str(ca), "-verify_return_error"]
    r = subprocess.run(cmd, input=b"Q\n", capture_output=True, timeout=20)
    out = (r.stdout + r.stderr).decode(errors="replace")
    negotiated = r.returncode == 0 and "Cipher is (NONE)" not in out and "Cipher is " in out
    return negotiated, out


@pytest.mark.parametrize("which", ["tenant", "admin"])
def test_old_protocols_and_cbc_suites_are_refused(served, which) -> None:  # type: ignore[no-untyped-def]
    home, port, admin = served
    p = port if which == "tenant" else admin
    # SECLEVEL=0 lets *this client* offer TLS 1.1, so that a refusal is the server's.
    ok, out = s_client(p, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert not ok, out
    ok, out = s_client(p, "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert not ok, out
    ok, out = s_client(p, "-tls1_2", "-cipher",
                       "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:"
                       "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:AES128-SHA")
    assert not ok, out
    ok, out = s_client(p, "-tls1_2", "-cipher", "AES256-GCM-SHA384")  # no ECDHE
    assert not ok, out
    help_text = subprocess.run(["openssl", "s_client", "-help"], capture_output=True).stderr
    if b"-ssl3" in help_text:
        ok, out = s_client(p, "-ssl3")
        assert not ok, out
    # (this OpenSSL has no SSLv3 at all: nothing can even offer it)


@pytest.mark.parametrize("which", ["tenant", "admin"])
def test_tls12_ecdhe_gcm_and_tls13_succeed_with_a_verified_chain(served, which) -> None:  # type: ignore[no-untyped-def]
    home, port, admin = served
    p = port if which == "tenant" else admin
    ca = home / "tls" / "ca.pem"
    ok, out = s_client(p, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", ca=ca)
    assert ok and "ECDHE-ECDSA-AES256-GCM-SHA384" in out, out
    assert "Verify return code: 0 (ok)" in out and "Compression: NONE" in out
    ok, out = s_client(p, "-tls1_3", ca=ca)
    assert ok and "TLSv1.3" in out and "Verify return code: 0 (ok)" in out, out
    ok, out = s_client(p, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305", ca=ca)
    assert ok, out


def test_plain_http_is_not_served(served) -> None:  # type: ignore[no-untyped-def]
    _, port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(1024)
        except (ConnectionResetError, socket.timeout):
            data = b""
    assert b'"status":"ok"' not in data


def test_key_files_are_private(served) -> None:  # type: ignore[no-untyped-def]
    home, _, _ = served
    for name in ("ca.key", "server.key"):
        assert (home / "tls" / name).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("overrides,ok", [
    ({}, True),
    ({"insecure_http": True}, True),
    ({"insecure_http": True, "host": "0.0.0.0"}, False),
    ({"admin_host": "0.0.0.0"}, False),
    ({"admin_host": "10.1.2.3"}, False),
    ({"admin_host": "0.0.0.0", "admin_allow_remote": True}, True),
    ({"host": "0.0.0.0"}, True),
    ({"port": 9000, "admin_port": 9000}, False),
])
def test_listen_policy(overrides, ok) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(None, **overrides)
    if ok:
        check_listen_policy(settings)
    else:
        with pytest.raises(InvalidConfiguration):
            check_listen_policy(settings)


def test_serve_refuses_a_remote_admin_api_unless_configured(tmp_path: Path) -> None:
    r = subprocess.run([KMS, "serve"], env=_env(tmp_path, KMS_ADMIN_HOST="0.0.0.0"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "admin API listens on loopback" in r.stderr
    assert r.stderr.count("\n") == 1


def test_client_certificates_guard_the_tenant_port_when_configured(tmp_path: Path) -> None:
    """With KMS_TLS_CLIENT_CA, the tenant port refuses a client without a certificate from
    that CA and accepts one with it; the admin port does not ask for one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from cli.tls import ensure_local_pki

    home = tmp_path / "home"
    subprocess.run([str(SETUP_TOKEN)], env=_env(home), check=True, capture_output=True)
    subprocess.run([KMS, "init"], env=_env(home), check=True, capture_output=True)
    clients = tmp_path / "clients"
    ensure_local_pki(clients)  # a separate CA for client certificates
    ca = x509.load_pem_x509_certificate((clients / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((clients / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hv-node-1")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    (tmp_path / "hv.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "hv.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    port, admin = _free_port(), _free_port()
    proc = subprocess.Popen([KMS, "serve", "--port", str(port), "--admin-port", str(admin)],
                            env=_env(home, KMS_TLS_CLIENT_CA=str(clients / "ca.pem")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server_ca = home / "tls" / "ca.pem"
        deadline = time.monotonic() + 20
        while not s_client(admin, "-tls1_3", ca=server_ca)[0]:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        ctx = ssl.create_default_context(cafile=str(server_ca))
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=5)
        ctx.load_cert_chain(str(tmp_path / "hv.pem"), str(tmp_path / "hv.key"))
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=5).json() \
            == {"status": "ok"}
        plain = ssl.create_default_context(cafile=str(server_ca))
        assert httpx.get(f"https://127.0.0.1:{admin}/healthz", verify=plain,
                         timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=15)
