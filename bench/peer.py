"""The peer: PyKMIP's server, and one client harness for both systems.

Runs with the interpreter of bench/.peer-venv (PyKMIP is not a project dependency):

    python -m bench.peer pki    --dir D                  # CA, server and client certs
    python -m bench.peer serve  --dir D --port P         # PyKMIP server on 127.0.0.1
    python -m bench.peer client --dir D --kmip-port P --ours-port Q --ours-ca CA
                                [--ours-noaudit-port R] --tokens-file FILE --seconds S
                                --concurrency 1,16

The client measures the operations both systems offer with the same harness (Python
threads, one persistent TLS connection per thread, time.perf_counter per call):
create a 256-bit AES key, get (release) a key, AES-GCM encrypt 1 KiB on the server.
PyKMIP: Create / Get / Encrypt over KMIP 1.2 TTLV on TLS 1.2 with client certificates.
Ours: POST /v1/volumes, POST /v1/volumes/{id}/key, POST /v1/keys/{k}/encrypt on HTTPS.
Each (system, operation, concurrency) run is bounded in time and in count.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import functools
import http.client
import ipaddress
import json
import logging
import os
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


# -- PKI ------------------------------------------------------------------------------------

def make_pki(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    if (d / "client.pem").exists():
        return
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        os.chmod(path, 0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench peer CA"))
          .issuer_name(name("bench peer CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, eku in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                     ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(f"bench-{who}"))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False))
        if who == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]),
                critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (d / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, d / f"{who}.key")
    (d / "policies").mkdir(exist_ok=True)


# -- the PyKMIP server ----------------------------------------------------------------------

def serve(d: Path, port: int) -> None:
    from kmip.services.server import KmipServer

    conf = d / "server.conf"
    conf.write_text("\n".join([
        "[server]", f"hostname={LOOPBACK}", f"port={port}",
        f"certificate_path={d / 'server.pem'}", f"key_path={d / 'server.key'}",
        f"ca_path={d / 'ca.pem'}", "auth_suite=TLS1.2", f"policy_path={d / 'policies'}",
        "enable_tls_client_auth=True", "logging_level=WARNING",
        f"database_path={d / 'pykmip.sqlite3'}", ""]))
    server = KmipServer(config_path=str(conf), log_path=str(d / "pykmip-server.log"),
                        live_policies=False)
    with server:
        server.serve()


# -- the client harness -----------------------------------------------------------------------

class _Ours:
    """One persistent HTTPS connection to our tenant API."""

    def __init__(self, port: int, ca: str, tokens: dict[str, Any], tag: str):
        ctx = ssl.create_default_context(cafile=ca)
        self.conn = http.client.HTTPSConnection(LOOPBACK, port, context=ctx, timeout=30)
        self.tokens, self.tag, self.n = tokens, tag, 0
        self.plain = base64.b64encode(os.urandom(1024)).decode()

    def _post(self, path: str, token: str, body: Any) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        self.conn.request("POST", path, body=data,
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": "application/json"})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{path}: HTTP {resp.status} {raw[:200]!r}")
        return json.loads(raw)

    def create(self) -> None:
        self.n += 1
        self._post("/v1/volumes", self.tokens["hypervisor"],
                   {"volume_id": f"peer-{self.tag}-{self.n}", "cipher": "aes-xts-plain64",
                    "key_bits": 256})

    def get(self) -> None:
        out = self._post(f"/v1/volumes/{self.tokens['volume']}/key", self.tokens["hypervisor"],
                         None)
        assert len(base64.b64decode(out["key"])) == 64

    def encrypt(self) -> None:
        out = self._post(f"/v1/keys/{self.tokens['key']}/encrypt", self.tokens["app"],
                         {"plaintext": self.plain})
        assert out["ciphertext"].startswith("kms:v")

    def close(self) -> None:
        self.conn.close()


class _Kmip:
    """One persistent KMIP/TLS connection to PyKMIP."""

    def __init__(self, port: int, d: Path, shared: dict[str, Any]):
        from kmip import enums
        from kmip.pie.client import ProxyKmipClient

        self.enums = enums
        conf = d / "client.conf"
        if not conf.exists():
            conf.write_text("[client]\n")
        self.client = ProxyKmipClient(hostname=LOOPBACK, port=port, cert=str(d / "client.pem"),
                                      key=str(d / "client.key"), ca=str(d / "ca.pem"),
                                      ssl_version="PROTOCOL_TLSv1_2", config="client",
                                      config_file=str(conf))
        self.client.open()
        self.shared = shared
        self.data = os.urandom(1024)
        self.params = {"cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
                       "block_cipher_mode": enums.BlockCipherMode.GCM, "tag_length": 16}

    def _new_key(self) -> str:
        e = self.enums
        return str(self.client.create(e.CryptographicAlgorithm.AES, 256,
                                      cryptographic_usage_mask=[e.CryptographicUsageMask.ENCRYPT,
                                                                e.CryptographicUsageMask.DECRYPT]))

    def prepare(self) -> None:
        uid = self._new_key()
        self.client.activate(uid)
        self.shared["uid"] = uid

    def create(self) -> None:
        self._new_key()

    def get(self) -> None:
        key = self.client.get(self.shared["uid"])
        assert len(key.value) == 32

    def encrypt(self) -> None:
        ct, iv = self.client.encrypt(self.data, uid=self.shared["uid"],
                                     cryptographic_parameters=self.params)
        assert len(ct) == 1024 and iv

    def close(self) -> None:
        self.client.close()


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _new_ours(port: int, ca: str, tokens: dict[str, Any], tag: str, i: int) -> _Ours:
    return _Ours(port, ca, tokens, f"{tag}-{i}")


def _run(make: Callable[[int], Any], op: str, concurrency: int, seconds: float,
         max_ops: int, server_pid: int | None) -> dict[str, Any]:
    clients = [make(i) for i in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[str] = []
    start = threading.Barrier(concurrency + 1)
    deadline_box: list[float] = []
    per_thread = max(1, max_ops // concurrency)

    def worker(i: int) -> None:
        fn = getattr(clients[i], op)
        start.wait()
        deadline = deadline_box[0]
        lat = latencies[i]
        try:
            while len(lat) < per_thread:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                if t1 >= deadline:
                    break
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    server0 = _cpu(server_pid) if server_pid else float("nan")
    self0 = time.process_time()
    t0 = time.perf_counter()
    deadline_box.append(t0 + seconds)
    start.wait()
    for t in threads:
        t.join(timeout=seconds + 60)
    wall = time.perf_counter() - t0
    client_cpu = (time.process_time() - self0) / wall
    server_cpu = ((_cpu(server_pid) - server0) / wall) if server_pid else float("nan")
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass
    allv = sorted(v for lat in latencies for v in lat)

    def pct(q: float) -> float:
        if not allv:
            return float("nan")
        return allv[min(len(allv) - 1, int(round((len(allv) - 1) * q / 100)))] * 1e3

    return {"ops": len(allv), "seconds": wall, "rate": len(allv) / wall if wall else 0.0,
            "p50_ms": pct(50), "p99_ms": pct(99), "errors": errors[:3],
            "client_cpu": client_cpu, "server_cpu": server_cpu,
            "error_count": len(errors)}


def client(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.ERROR)
    d = Path(args.dir)
    tokens = json.loads(Path(args.tokens_file).read_text())
    shared: dict[str, Any] = {}
    _Kmip(args.kmip_port, d, shared).prepare()
    results: list[dict[str, Any]] = []
    pids = {k: int(v) for k, v in (item.split(":") for item in args.server_pids.split(",")
                                     if item)}
    run_no = 0
    for c in args.concurrency:
        for op in ("create", "get", "encrypt"):
            systems = ["pykmip", "ours"] + (["ours-noaudit"] if args.ours_noaudit_port else [])
            for system in systems:
                run_no += 1
                tag = f"{os.getpid()}-{run_no}"
                make: Callable[[int], Any]
                if system == "pykmip":
                    make = lambda i: _Kmip(args.kmip_port, d, shared)  # noqa: E731
                else:
                    port = args.ours_port if system == "ours" else args.ours_noaudit_port
                    make = functools.partial(_new_ours, port, args.ours_ca, tokens, tag)
                r = _run(make, op, c, args.seconds, args.max_ops, pids.get(system))
                r.update(system=system, op=op, concurrency=c)
                print(json.dumps({"progress": r}), file=sys.stderr, flush=True)
                results.append(r)
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pki")
    p.add_argument("--dir", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("client")
    p.add_argument("--dir", required=True)
    p.add_argument("--kmip-port", type=int, required=True)
    p.add_argument("--ours-port", type=int, required=True)
    p.add_argument("--ours-noaudit-port", type=int, default=0)
    p.add_argument("--ours-ca", required=True)
    p.add_argument("--tokens-file", required=True)
    p.add_argument("--server-pids", default="", help="system:pid,... for CPU readings")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--max-ops", type=int, default=200_000)
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1, 16])
    args = parser.parse_args()
    if args.cmd == "pki":
        make_pki(Path(args.dir))
    elif args.cmd == "serve":
        serve(Path(args.dir), args.port)
    else:
        print(json.dumps(client(args)))


if __name__ == "__main__":
    main()
