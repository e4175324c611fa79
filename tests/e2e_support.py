"""Helpers shared by the end-to-end test modules (tests/test_e2e_*.py); no tests here.

What it offers, for a module that drives the real `kms` command and a real `kms serve`
process over its own fresh KMS_HOME (never ./var, never the session's token):

- constants: REPO, SETUP_TOKEN, KMS (the `kms` command of this interpreter), READY_TIMEOUT;
- `requires_tools`: a skip marker for missing external commands;
- the `kms` command: `kms_env`, `kms_proc` (a run, optionally under a prefix such as
  faketime), `run_kms` (a run with --json that must succeed), `init_home` (setup-token.sh,
  then `kms init`), `issue_tokens` (principals created with the CLI);
- the server: `Server` (TLS context verified against the local CA, clients, alive, stop),
  `start_server` (free ports, output captured to a file, waits for /readyz) and
  `stopped_log`;
- HTTP: `b64`, `unb64`, `create_volume`, `fetch_volume_key`;
- QEMU LUKS: `qemu`, `write_passphrase` (the key in hex, mode 0600), `luks_secret`,
  `Passphrase`, `luks_create` (retries qemu-img's "Unable to get accurate CPU usage"),
  `image_opts`;
- secrets: `SecretLog` (one per module: every secret handled, for the final log scan),
  `encodings` and `leaked_form` (is a secret in a blob, in any usual encoding).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, SETUP_TOKEN

__all__ = [
    "KMS", "READY_TIMEOUT", "REPO", "SETUP_TOKEN", "Passphrase", "SecretLog", "Server", "b64",
    "create_volume", "encodings", "fetch_volume_key", "free_port", "image_opts", "init_home",
    "issue_tokens", "kms_env", "kms_proc", "leaked_form", "luks_create", "luks_secret", "qemu",
    "requires_tools", "run_kms", "start_server", "stopped_log", "unb64", "write_passphrase",
]

KMS = Path(sys.executable).parent / "kms"
READY_TIMEOUT = 20.0


def requires_tools(*tools: str, install: str) -> pytest.MarkDecorator:
    """Skip the module unless every command in `tools` is on PATH."""
    return pytest.mark.skipif(any(shutil.which(t) is None for t in tools),
                              reason=f"needs {', '.join(tools)} (apt-get install {install})")


# -- secrets ----------------------------------------------------------------------------

class SecretLog:
    """Every secret that crosses one test module, as (kind, bytes); the module's last test
    looks for each of them in the server's output. Thread safe; one instance per module."""

    def __init__(self) -> None:
        self._items: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def remember(self, kind: str, secret: bytes | str) -> None:
        with self._lock:
            self._items.append((kind, secret.encode() if isinstance(secret, str) else secret))

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def by_value(self) -> dict[bytes, str]:
        """secret -> kind, deduplicated."""
        with self._lock:
            return {secret: kind for kind, secret in self._items}


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


def leaked_form(secret: bytes, blob: bytes) -> bytes | None:
    """The first encoding of `secret` found in `blob`, or None."""
    return next((form for form in encodings(secret) if form in blob), None)


# -- the `kms` command --------------------------------------------------------------------

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


def kms_proc(home: Path, *args: str, prefix: tuple[str, ...] = (),
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = kms_env(home)
    env.update(extra_env or {})
    return subprocess.run([*prefix, str(KMS), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def run_kms(home: Path, *args: str) -> Any:
    proc = kms_proc(home, *args, "--json")
    assert proc.returncode == 0, f"kms {args[:2]} failed: {proc.stderr.strip()}"
    return json.loads(proc.stdout)


def init_home(home: Path, secrets: SecretLog) -> None:
    """A fresh KMS_HOME: its own SoftHSM token and PINs (remembered), then `kms init`."""
    proc = subprocess.run([str(SETUP_TOKEN)], env=kms_env(home), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"setup-token.sh failed: {proc.stderr.strip()}"
    pin_files = sorted((home / "secrets").glob("*.pin"))
    for pin_file in pin_files:
        secrets.remember(f"PIN {pin_file.name}", pin_file.read_text().strip())
    assert len(pin_files) >= 2, "setup-token.sh wrote no user/SO PIN files"
    run_kms(home, "init")


def issue_tokens(home: Path, tenant_id: str, roles: Iterable[str], *, name_prefix: str,
                 label: str, secrets: SecretLog) -> dict[str, str]:
    """One principal per role in the tenant, created with the CLI; role -> bearer token,
    each remembered as "<label> (<role>)"."""
    tokens: dict[str, str] = {}
    for role in roles:
        issued = run_kms(home, "principal", "create", "--tenant", tenant_id, "--role", role,
                         "--name", f"{name_prefix}-{role}")
        assert issued["tenant"] == tenant_id and issued["role"] == role
        tokens[role] = issued["token"]
        secrets.remember(f"{label} ({role})", issued["token"])
    return tokens


# -- the server ---------------------------------------------------------------------------

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

    def client(self, token: str) -> httpx.Client:
        """A client that sends this bearer token."""
        return httpx.Client(base_url=self.base_url, timeout=30.0, verify=self.tls,
                            headers={"Authorization": f"Bearer {token}"})

    def role_client(self, role: str) -> httpx.Client:
        """A client with the token of `role` in `tokens`."""
        return self.client(self.tokens[role])

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


def start_server(home: Path, log_path: Path, tokens: dict[str, str] | None = None) -> Server:
    """`kms serve` on 127.0.0.1 and free ports, stdout+stderr captured to `log_path`;
    returns once /readyz answers 200 over verified TLS, fails the test (server stopped)
    if it exits or is not ready within READY_TIMEOUT."""
    port = free_port()
    args = [str(KMS), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--admin-port", str(free_port())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, env=kms_env(home), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = Server(home, f"https://127.0.0.1:{port}", proc, log_path, dict(tokens or {}))
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if not srv.alive():
            pytest.fail(f"kms serve exited with {proc.returncode}:\n"
                        f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{srv.base_url}/readyz", timeout=2.0, verify=srv.tls).status_code == 200:
                return srv
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            srv.stop()
            pytest.fail(f"kms serve not ready after {READY_TIMEOUT:.0f} s:\n"
                        f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


def stopped_log(server: Server) -> bytes:
    """Stops the server and returns its whole output, which must show it served."""
    server.stop()
    log = server.log_path.read_bytes()
    assert log.strip(), "the server wrote no log at all: this test would prove nothing"
    assert b"tenant API listening" in log or b"Uvicorn running" in log
    return log


# -- HTTP ---------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def create_volume(client: httpx.Client, volume_id: str) -> httpx.Response:
    return client.post("/v1/volumes", json={"volume_id": volume_id, "cipher": "aes-xts-plain64",
                                            "key_bits": 512})


def fetch_volume_key(client: httpx.Client, volume_id: str, secrets: SecretLog) -> bytes:
    """POST /v1/volumes/<id>/key: a 512-bit aes-xts-plain64 key (remembered)."""
    r = client.post(f"/v1/volumes/{volume_id}/key")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["volume_id"] == volume_id
    assert body["cipher"] == "aes-xts-plain64" and body["key_bits"] == 512
    key = unb64(body["key"])
    secrets.remember(f"volume key {volume_id}", key)
    assert len(key) == 64
    return key


# -- QEMU LUKS ----------------------------------------------------------------------------

def qemu(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"{args[0]} failed: {proc.stdout}{proc.stderr}"
    return proc


def write_passphrase(path: Path, key: bytes) -> Path:
    # QEMU wants a LUKS passphrase that is valid UTF-8, so 64 random bytes (format=base64)
    # are refused; as OpenStack Nova/os-brick do, the passphrase is the key in hex.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return path


def luks_secret(passphrase_file: Path) -> str:
    """The qemu `--object` that reads the passphrase file as secret `sec0`."""
    return f"secret,id=sec0,file={passphrase_file},format=raw"


class Passphrase:
    """A 0600 passphrase file that exists only inside the `with` block."""

    def __init__(self, directory: Path, key: bytes):
        self.path = directory / f"pass-{os.getpid()}-{time.time_ns()}.hex"
        self.key = key

    def __enter__(self) -> str:
        write_passphrase(self.path, self.key)
        assert (self.path.stat().st_mode & 0o777) == 0o600
        return luks_secret(self.path)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


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


def image_opts(img: Path) -> str:
    return f"driver=luks,key-secret=sec0,file.filename={img}"
