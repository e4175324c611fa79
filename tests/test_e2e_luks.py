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

import base64
import binascii
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                       reason="qemu-img/qemu-io not installed (apt-get install qemu-utils)"),
]

REPO = Path(__file__).resolve().parents[1]
SETUP_TOKEN = REPO / "softhsm-setup" / "setup-token.sh"
KMS = Path(sys.executable).parent / "kms"
READY_TIMEOUT = 20.0

# Every secret that crosses this module, as (kind, bytes); the last test looks for each
# of them in the server's output.
SECRETS: list[tuple[str, bytes]] = []
_SECRETS_LOCK = threading.Lock()


def remember(kind: str, secret: bytes | str) -> None:
    with _SECRETS_LOCK:
        SECRETS.append((kind, secret.encode() if isinstance(secret, str) else secret))


# -- helpers ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kms_env(home: Path) -> dict[str, str]:
    """The environment of every `kms` subprocess: this module's home and token only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMS_")}
    env["KMS_HOME"] = str(home)
    env["SOFTHSM2_CONF"] = str(home / "softhsm" / "softhsm2.conf")
    return env


def run_kms(home: Path, *args: str) -> Any:
    proc = subprocess.run([str(KMS), *args, "--json"], env=kms_env(home), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"kms {args[:2]} failed: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def qemu(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, f"{args[0]} failed: {proc.stdout}{proc.stderr}"
    return proc


@dataclass
class Server:
    home: Path
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)  # role -> bearer token

    @property
    def tls(self) -> ssl.SSLContext:
        """Verifies the server certificate against the local CA made by `kms init`."""
        return ssl.create_default_context(cafile=str(self.home / "tls" / "ca.pem"))

    def client(self, role: str) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30.0, verify=self.tls,
                            headers={"Authorization": f"Bearer {self.tokens[role]}"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh KMS_HOME: its own SoftHSM token and PINs, then `kms init`."""
    home = tmp_path_factory.mktemp("e2e-kms-home")
    proc = subprocess.run([str(SETUP_TOKEN)], env=kms_env(home), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"setup-token.sh failed: {proc.stderr.strip()}"
    for pin_file in sorted((home / "secrets").glob("*.pin")):
        remember(f"PIN {pin_file.name}", pin_file.read_text().strip())
    assert len(SECRETS) >= 2, "setup-token.sh wrote no user/SO PIN files"
    run_kms(home, "init")
    return home


@pytest.fixture(scope="module")
def server(e2e_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`kms serve` on free ports, stdout+stderr captured to a file; one tenant with a
    hypervisor, a tenant-admin and an app principal created with the CLI."""
    tenant = run_kms(e2e_home, "tenant", "create", f"e2e-{os.getpid()}-{time.time_ns()}")
    tokens: dict[str, str] = {}
    for role in ("hypervisor", "tenant-admin", "app"):
        issued = run_kms(e2e_home, "principal", "create", "--tenant", tenant["id"],
                         "--role", role, "--name", f"e2e-{role}")
        assert issued["tenant"] == tenant["id"] and issued["role"] == role
        tokens[role] = issued["token"]
        remember(f"bearer token ({role})", issued["token"])

    port = free_port()
    log_path = tmp_path_factory.mktemp("e2e-kms-log") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(KMS), "serve", "--port", str(port), "--admin-port", str(free_port())],
            env=kms_env(e2e_home), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    srv = Server(e2e_home, f"https://127.0.0.1:{port}", proc, log_path, tokens)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if not srv.alive():
                pytest.fail(f"kms serve exited with {proc.returncode}:\n"
                            f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{srv.base_url}/readyz", timeout=2.0, verify=srv.tls).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kms serve not ready after {READY_TIMEOUT:.0f} s:\n"
                            f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield srv
    finally:
        srv.stop()


# -- a. QEMU LUKS with a volume key -------------------------------------------------------

def fetch_volume_key(client: httpx.Client, volume_id: str) -> bytes:
    r = client.post(f"/v1/volumes/{volume_id}/key")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["volume_id"] == volume_id
    assert body["cipher"] == "aes-xts-plain64" and body["key_bits"] == 512
    key = unb64(body["key"])
    remember(f"volume key {volume_id}", key)
    assert len(key) == 64
    return key


def write_passphrase(path: Path, key: bytes) -> Path:
    # QEMU wants a LUKS passphrase that is valid UTF-8, so 64 random bytes (format=base64)
    # are refused; as OpenStack Nova/os-brick do, the passphrase is the key in hex.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return path


def luks_create(img: Path, secret: str) -> None:
    # qemu-img times PBKDF2 with the thread CPU clock; a coarse virtual clock can read
    # 0 ms and make it give up ("Unable to get accurate CPU usage"): retry that only.
    for attempt in range(6):
        img.unlink(missing_ok=True)
        proc = qemu("qemu-img", "create", "-q", "-f", "luks", "--object", secret,
                    "-o", "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10",
                    str(img), "16M", check=False)
        if proc.returncode == 0:
            return
        if "Unable to get accurate CPU usage" not in proc.stderr or attempt == 5:
            pytest.fail(f"qemu-img create failed: {proc.stderr.strip()}")


def test_luks_volume_lifecycle(server: Server, tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    vol1, vol2 = "e2e-luks-1", "e2e-luks-2"
    with server.client("hypervisor") as hv:
        for vol in (vol1, vol2):
            r = hv.post("/v1/volumes", json={"volume_id": vol, "cipher": "aes-xts-plain64",
                                             "key_bits": 512})
            assert r.status_code == 201, r.text
            assert r.json()["volume_id"] == vol
        key1 = fetch_volume_key(hv, vol1)
        key2 = fetch_volume_key(hv, vol2)
        assert key1 != key2
        assert fetch_volume_key(hv, vol1) == key1

        file1 = write_passphrase(tmp_path / "key1.hex", key1)
        file2 = write_passphrase(tmp_path / "key2.hex", key2)
        assert (file1.stat().st_mode & 0o777) == 0o600
        secret1 = f"secret,id=sec0,file={file1},format=raw"
        secret2 = f"secret,id=sec0,file={file2},format=raw"
        img = tmp_path / "vol1.luks"
        image_opts = f"driver=luks,key-secret=sec0,file.filename={img}"

        luks_create(img, secret1)
        assert img.read_bytes()[:6] == b"LUKS\xba\xbe"

        out = qemu("qemu-io", "--object", secret1, "--image-opts", image_opts,
                   "-c", "write -P 0xa5 0 1M")
        assert "wrote 1048576/1048576 bytes" in out.stdout
        out = qemu("qemu-io", "--object", secret1, "--image-opts", image_opts,
                   "-c", "read -P 0xa5 0 1M")
        assert "Pattern verification failed" not in out.stdout + out.stderr
        assert "read 1048576/1048576 bytes" in out.stdout
        # The ciphertext on disk is not the pattern.
        assert b"\xa5" * 4096 not in img.read_bytes()

        wrong = qemu("qemu-io", "--object", secret2, "--image-opts", image_opts,
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
        assert fetch_volume_key(hv, vol2) == key2


# -- b. concurrency -------------------------------------------------------------------------

THREADS = 8
REQUESTS_PER_THREAD = 50
APP_KEY = "e2e-concurrency"


def test_concurrent_mixed_requests(server: Server) -> None:
    with server.client("tenant-admin") as admin:
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
        hv = server.client("hypervisor")
        app = server.client("app")

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
            remember(f"volume key {vol}", key)
            assert len(key) == 64 and r.json()["volume_id"] == vol
            with lock:
                first = volume_keys[vol] or key
                volume_keys[vol] = first
                fetches[vol] += 1
            assert key == first, f"volume {vol} answered two different keys"

        def encrypt() -> None:
            plaintext = os.urandom(rng.randrange(24, 96))
            context = os.urandom(16) if rng.random() < 0.5 else b""
            remember("encrypt plaintext", plaintext)
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
            remember("data key", plaintext)
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
    with server.client("hypervisor") as hv:
        listed = {v["volume_id"] for v in hv.get("/v1/volumes").json()["volumes"]}
    assert set(volume_keys) <= listed


# -- c. nothing secret in the server's output (keep this test last) ------------------------

def encodings(secret: bytes) -> set[bytes]:
    """The forms under which a secret could show up in a log line."""
    forms = {
        secret,
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        binascii.hexlify(secret),
        binascii.hexlify(secret).upper(),
        repr(secret)[2:-1].encode(),  # b'...' as printed by Python
    }
    try:
        text = secret.decode()
    except UnicodeDecodeError:
        pass
    else:
        forms.add(text.encode())
        forms.add(json.dumps(text)[1:-1].encode())  # as escaped inside a JSON string
    return {f for f in forms if len(f) >= 8}


def test_zz_server_log_holds_no_secret(server: Server) -> None:
    server.stop()
    log = server.log_path.read_bytes()
    assert log.strip(), "the server wrote no log at all: this test would prove nothing"
    assert b"tenant API listening" in log or b"Uvicorn running" in log
    with _SECRETS_LOCK:
        secrets = dict((secret, kind) for kind, secret in SECRETS)  # deduplicated
    assert len(secrets) >= 5, "no secrets were collected: run the whole module"
    leaks = []
    for secret, kind in secrets.items():
        for form in encodings(secret):
            if form in log:
                leaks.append(f"{kind} ({len(secret)} bytes) found in the log "
                             f"(as a {len(form)}-character encoding)")
                break
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
    with _SECRETS_LOCK:
        secrets = dict((secret, kind) for kind, secret in SECRETS)
    assert len(secrets) >= 5
    leaks = [f"{kind} in {where}" for secret, kind in secrets.items()
             for where, blob in (("dump", dump), ("db files", raw), ("export", export.stdout))
             if any(form in blob for form in encodings(secret))]
    assert not leaks, "\n".join(sorted(set(leaks)))
