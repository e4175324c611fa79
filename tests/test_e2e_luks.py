"""End to end: the real `kms` command and a real `kms serve` process over a fresh SoftHSM
token, driven over HTTP like a storage hypervisor and an application would.

- everything over TLS, the server certificate verified against the local CA;
- a QEMU LUKS image is formatted and opened with a volume key from the KMS; another
  volume's key cannot open it; after DELETE the key answers 404;
- 8 threads x 50 mixed requests: no 5xx, no connection error, every answer correct, and
  the server is still alive;
- last: the server's captured output holds none of the secrets handled in this module
  (tokens, volume keys, plaintexts, data keys, PINs), in any usual encoding.

The module owns its KMS_HOME (token, PINs, database): it never touches ./var nor the
token of the rest of the test session.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Before the import below, so that pytest rewrites the asserts in the shared helpers too.
pytest.register_assert_rewrite("tests.e2e_support")

from tests.e2e_support import (
    KMS,
    SecretLog,
    Server,
    b64,
    create_volume,
    fetch_volume_key,
    image_opts,
    init_home,
    issue_tokens,
    kms_env,
    leaked_form,
    luks_create,
    luks_secret,
    qemu,
    requires_tools,
    run_kms,
    start_server,
    stopped_log,
    unb64,
    write_passphrase,
)

pytestmark = [pytest.mark.e2e, requires_tools("qemu-img", "qemu-io", install="qemu-utils")]

# Every secret that crosses this module; the last tests look for each of them in the
# server's output, the database and the audit export.
SECRETS = SecretLog()


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh KMS_HOME: its own SoftHSM token and PINs, then `kms init`."""
    home = tmp_path_factory.mktemp("e2e-kms-home")
    init_home(home, SECRETS)
    return home


@pytest.fixture(scope="module")
def server(e2e_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kms serve` on free ports, stdout+stderr captured to a file; one tenant with a
    hypervisor, a tenant-admin and an app principal created with the CLI."""
    tenant = run_kms(e2e_home, "tenant", "create", f"e2e-{os.getpid()}-{time.time_ns()}")
    tokens = issue_tokens(e2e_home, tenant["id"], ("hypervisor", "tenant-admin", "app"),
                          name_prefix="e2e", label="bearer token", secrets=SECRETS)
    log_path = tmp_path_factory.mktemp("e2e-kms-log") / "server.log"
    srv = start_server(e2e_home, log_path, tokens)
    try:
        yield srv
    finally:
        srv.stop()


# -- a. QEMU LUKS with a volume key -------------------------------------------------------

def test_luks_volume_lifecycle(server: Server, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    vol1, vol2 = "e2e-luks-1", "e2e-luks-2"
    with server.role_client("hypervisor") as hv:
        for vol in (vol1, vol2):
            r = create_volume(hv, vol)
            assert r.status_code == 201, r.text
            assert r.json()["volume_id"] == vol
        key1 = fetch_volume_key(hv, vol1, SECRETS)
        key2 = fetch_volume_key(hv, vol2, SECRETS)
        assert key1 != key2
        assert fetch_volume_key(hv, vol1, SECRETS) == key1

        file1 = write_passphrase(tmp_path / "key1.hex", key1)
        file2 = write_passphrase(tmp_path / "key2.hex", key2)
        assert (file1.stat().st_mode & 0o777) == 0o600
        secret1, secret2 = luks_secret(file1), luks_secret(file2)
        img = tmp_path / "vol1.luks"
        opts = image_opts(img)

        luks_create(img, secret1)
        assert img.read_bytes()[:6] == b"LUKS\xba\xbe"

        out = qemu("qemu-io", "--object", secret1, "--image-opts", opts,
                   "-c", "write -P 0xa5 0 1M")
        assert "wrote 1048576/1048576 bytes" in out.stdout
        out = qemu("qemu-io", "--object", secret1, "--image-opts", opts,
                   "-c", "read -P 0xa5 0 1M")
        assert "Pattern verification failed" not in out.stdout + out.stderr
        assert "read 1048576/1048576 bytes" in out.stdout
        # The ciphertext on disk is not the pattern.
        assert b"\xa5" * 4096 not in img.read_bytes()

        wrong = qemu("qemu-io", "--object", secret2, "--image-opts", opts,
                     "-c", "read 0 1M", check=False)
        assert wrong.returncode != 0, "key 2 opened the image made with key 1"
        assert "Invalid password" in wrong.stdout + wrong.stderr

        r = hv.delete(f"/v1/volumes/{vol1}")
        assert r.status_code == 204, r.text
        r = hv.post(f"/v1/volumes/{vol1}/key")
        assert r.status_code == 404, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "key" not in r.json()
        listed = {v["volume_id"] for v in hv.get("/v1/volumes").json()["volumes"]}
        assert vol1 not in listed and vol2 in listed
        assert fetch_volume_key(hv, vol2, SECRETS) == key2


# -- b. concurrency -------------------------------------------------------------------------

THREADS = 8
REQUESTS_PER_THREAD = 50
APP_KEY = "e2e-concurrency"


def test_concurrent_mixed_requests(server: Server) -> None:
    with server.role_client("tenant-admin") as admin:
        r = admin.post("/v1/keys", json={"name": APP_KEY})
        assert r.status_code == 201, r.text

    lock = threading.Lock()
    volume_keys: dict[str, bytes] = {}          # volume id -> first key seen
    fetches: Counter[str] = Counter()
    sealed: list[tuple[str, bytes, bytes]] = []  # (ciphertext, context, plaintext)
    failures: list[str] = []
    counts: Counter[str] = Counter()
    start = threading.Barrier(THREADS)

    def worker(n: int) -> None:
        rng = random.Random(n)
        created = 0
        hv = server.role_client("hypervisor")
        app = server.role_client("app")

        def call(client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
            r = client.request(method, path, **kw)
            assert r.status_code < 500, f"{method} {path} -> {r.status_code} {r.text[:200]}"
            return r

        def create_volume() -> None:
            nonlocal created
            vol = f"cc-{n}-{created}"
            created += 1
            r = call(hv, "POST", "/v1/volumes",
                     json={"volume_id": vol, "cipher": "aes-xts-plain64", "key_bits": 512})
            assert r.status_code == 201, f"create {vol}: {r.status_code} {r.text[:200]}"
            with lock:
                volume_keys.setdefault(vol, b"")

        def fetch_key() -> None:
            with lock:
                known = sorted(volume_keys)
            if not known:
                create_volume()
                return
            vol = rng.choice(known)
            r = call(hv, "POST", f"/v1/volumes/{vol}/key")
            assert r.status_code == 200, f"key {vol}: {r.status_code} {r.text[:200]}"
            key = unb64(r.json()["key"])
            SECRETS.remember(f"volume key {vol}", key)
            assert len(key) == 64 and r.json()["volume_id"] == vol
            with lock:
                first = volume_keys[vol] or key
                volume_keys[vol] = first
                fetches[vol] += 1
            assert key == first, f"volume {vol} answered two different keys"

        def encrypt() -> None:
            plaintext = os.urandom(rng.randrange(24, 96))
            context = os.urandom(16) if rng.random() < 0.5 else b""
            SECRETS.remember("encrypt plaintext", plaintext)
            body = {"plaintext": b64(plaintext)}
            if context:
                body["context"] = b64(context)
            r = call(app, "POST", f"/v1/keys/{APP_KEY}/encrypt", json=body)
            assert r.status_code == 200, f"encrypt: {r.status_code} {r.text[:200]}"
            ciphertext = r.json()["ciphertext"]
            assert ciphertext.startswith("kms:v1:") and r.json()["key_version"] == 1
            assert b64(plaintext) not in ciphertext
            with lock:
                sealed.append((ciphertext, context, plaintext))

        def decrypt() -> None:
            with lock:
                item = sealed.pop(rng.randrange(len(sealed))) if sealed else None
            if item is None:
                encrypt()
                return
            ciphertext, context, plaintext = item
            body = {"ciphertext": ciphertext}
            if context:
                body["context"] = b64(context)
            r = call(app, "POST", f"/v1/keys/{APP_KEY}/decrypt", json=body)
            assert r.status_code == 200, f"decrypt: {r.status_code} {r.text[:200]}"
            assert unb64(r.json()["plaintext"]) == plaintext, "decrypt returned other bytes"

        def datakey() -> None:
            r = call(app, "POST", f"/v1/keys/{APP_KEY}/datakey", json={"bits": 256})
            assert r.status_code == 200, f"datakey: {r.status_code} {r.text[:200]}"
            plaintext = unb64(r.json()["plaintext"])
            SECRETS.remember("data key", plaintext)
            assert len(plaintext) == 32
            with lock:
                sealed.append((r.json()["ciphertext"], b"", plaintext))

        ops = [create_volume, fetch_key, fetch_key, encrypt, decrypt, datakey]
        try:
            start.wait(timeout=30)
            for i in range(REQUESTS_PER_THREAD):
                op = create_volume if i == 0 else rng.choice(ops)
                try:
                    op()
                    with lock:
                        counts[op.__name__] += 1
                except httpx.TransportError as exc:
                    with lock:
                        failures.append(f"thread {n} {op.__name__}: {type(exc).__name__}")
                except AssertionError as exc:
                    with lock:
                        failures.append(f"thread {n} {op.__name__}: {exc}")
        finally:
            hv.close()
            app.close()

    threads = [threading.Thread(target=worker, args=(n,), name=f"e2e-{n}")
               for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"

    assert not failures, f"{len(failures)} failed requests:\n" + "\n".join(failures[:20])
    assert sum(counts.values()) == THREADS * REQUESTS_PER_THREAD
    # The checks were not vacuous: volumes were fetched more than once, and decrypted.
    assert any(c >= 2 for c in fetches.values()), fetches
    assert counts["decrypt"] > 0 and counts["create_volume"] >= THREADS, counts
    assert server.alive(), "kms serve died under concurrent load"
    assert httpx.get(f"{server.base_url}/readyz", timeout=5.0, verify=server.tls).status_code == 200
    # Every volume created by the workers is listed (nothing lost).
    with server.role_client("hypervisor") as hv:
        listed = {v["volume_id"] for v in hv.get("/v1/volumes").json()["volumes"]}
    assert set(volume_keys) <= listed


# -- c. nothing secret in the server's output (keep this test last) ------------------------

def test_zz_server_log_holds_no_secret(server: Server) -> None:
    log = stopped_log(server)
    secrets = SECRETS.by_value()  # deduplicated
    assert len(secrets) >= 5, "no secrets were collected: run the whole module"
    leaks = []
    for secret, kind in secrets.items():
        form = leaked_form(secret, log)
        if form is not None:
            leaks.append(f"{kind} ({len(secret)} bytes) found in the log "
                         f"(as a {len(form)}-character encoding)")
    assert not leaks, "\n".join(leaks)


def test_zz_database_journal_and_exports_hold_no_secret(server: Server) -> None:
    """After the runs above: a dump of the database (and its raw files), the audit journal
    export and its verification hold none of the secrets handled (issue 5, point 4)."""
    import sqlite3

    server.stop()
    db_path = server.home / "kms.sqlite3"
    with sqlite3.connect(db_path) as conn:
        dump = "\n".join(conn.iterdump()).encode()
    raw = b"".join(p.read_bytes() for p in server.home.glob("kms.sqlite3*"))
    export = subprocess.run([str(KMS), "audit", "export"], env=kms_env(server.home),
                            capture_output=True, timeout=60)
    assert export.returncode == 0 and export.stdout.count(b"\n") >= 10, export.stderr
    assert b'"action": "volume.key_fetch"' in export.stdout
    verify = subprocess.run([str(KMS), "audit", "verify"], env=kms_env(server.home),
                            capture_output=True, timeout=120)
    assert verify.returncode == 0, verify.stderr
    secrets = SECRETS.by_value()
    assert len(secrets) >= 5
    leaks = [f"{kind} in {where}" for secret, kind in secrets.items()
             for where, blob in (("dump", dump), ("db files", raw), ("export", export.stdout))
             if leaked_form(secret, blob) is not None]
    assert not leaks, "\n".join(sorted(set(leaks)))
