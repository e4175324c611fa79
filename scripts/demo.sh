#!/usr/bin/env bash
# End-to-end demo: a hypervisor gets two volume keys from the KMS, formats a QEMU LUKS
# image with the first, shows that the second cannot open it, then deletes the volume
# and shows that its key is gone (crypto-erasure of that volume).
#
# Assumes `kms init` has run for $KMS_HOME (`make demo` does it). Never prints key
# material or tokens: keys go (hex-encoded) to mode-0600 files in a private temporary
# directory, and the bearer token reaches curl through a config file, never argv.
set -euo pipefail

cd "$(dirname "$0")/.."
KMS_HOME=${KMS_HOME:-./var}
export KMS_HOME
KMS=${KMS:-.venv/bin/kms}
if [ -z "${SOFTHSM2_CONF:-}" ] && [ -f "$KMS_HOME/softhsm/softhsm2.conf" ]; then
  export SOFTHSM2_CONF="$KMS_HOME/softhsm/softhsm2.conf"
fi

ok()   { printf '✓ %s\n' "$*"; }
die()  { printf '✗ %s\n' "$*" >&2; exit 1; }

for tool in qemu-img qemu-io curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (run: make system-deps)"
done
[ -x "$KMS" ] || die "$KMS not found (run: make venv)"

umask 077
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kms-demo.XXXXXXXX")
SERVER_PID=""
PRINCIPAL_ID=""
cleanup() {
  local rc=$?
  # The demo tenant stays in $KMS_HOME (its history is in the audit journal); its
  # credential does not outlive the demo.
  if [ -n "$PRINCIPAL_ID" ]; then
    "$KMS" principal revoke "$PRINCIPAL_ID" >/dev/null 2>&1 || true
  fi
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$WORK/server.log" ]; then
    echo "--- last lines of the server log ---" >&2
    tail -n 20 "$WORK/server.log" >&2 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

json_field() {  # json_field FILE FIELD: print one top-level field of a JSON file
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# -- tenant and hypervisor principal, with the operators' CLI ---------------------------
TENANT_NAME="demo-$(date +%s)-$$"
"$KMS" tenant create "$TENANT_NAME" --json >"$WORK/tenant.json" || die "tenant create failed"
TENANT_ID=$(json_field "$WORK/tenant.json" id)
ok "tenant $TENANT_NAME created ($TENANT_ID)"

"$KMS" principal create --tenant "$TENANT_ID" --role hypervisor --name hv1 --json \
  >"$WORK/principal.json" || die "principal create failed"
PRINCIPAL_ID=$(json_field "$WORK/principal.json" id)
# curl reads the Authorization header from a config file: the token stays out of argv.
python3 - "$WORK/principal.json" "$WORK/curl.conf" <<'PY'
import json, sys
token = json.load(open(sys.argv[1]))["token"]
with open(sys.argv[2], "w") as fh:
    fh.write(f'header = "Authorization: Bearer {token}"\n')
PY
rm -f "$WORK/principal.json"
ok "hypervisor principal created ($PRINCIPAL_ID, token kept in a 0600 file)"

# -- the server, on a free port ----------------------------------------------------------
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}
PORT=$(free_port)
ADMIN_PORT=$(free_port)   # its own ports: a `make serve` may be running beside it
BASE="https://127.0.0.1:$PORT"
export CURL_CA_BUNDLE="$KMS_HOME/tls/ca.pem"   # verify the server against the local CA
"$KMS" serve --port "$PORT" --admin-port "$ADMIN_PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  if curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; then break; fi
  kill -0 "$SERVER_PID" 2>/dev/null || die "kms serve exited early"
  sleep 0.2
done
curl -fsS -o /dev/null "$BASE/readyz" || die "kms serve not ready after 20 s"
ok "kms serve ready on $BASE (pid $SERVER_PID)"

api() {  # api METHOD PATH [BODY] -> prints the HTTP status; the body goes to $WORK/resp
  local method=$1 path=$2 body=${3:-}
  local args=(-sS -K "$WORK/curl.conf" -X "$method" -o "$WORK/resp" -w '%{http_code}')
  if [ -n "$body" ]; then args+=(-H 'Content-Type: application/json' --data "$body"); fi
  curl "${args[@]}" "$BASE$path"
}
expect() {  # expect WANT GOT WHAT
  [ "$1" = "$2" ] || die "$3: expected HTTP $1, got $2"
}

# -- two volumes and their keys ----------------------------------------------------------
VOL1="demo-vol-$$-1"
VOL2="demo-vol-$$-2"
for vol in "$VOL1" "$VOL2"; do
  status=$(api POST /v1/volumes "{\"volume_id\":\"$vol\",\"cipher\":\"aes-xts-plain64\",\"key_bits\":512}")
  expect 201 "$status" "create volume $vol"
  ok "volume $vol created (aes-xts-plain64, 512-bit key)"
done

fetch_key() {  # fetch_key VOLUME FILE: the key, hex-encoded, into FILE (0600); nothing on stdout
  local status
  status=$(api POST "/v1/volumes/$1/key")
  expect 200 "$status" "fetch key of $1"
  python3 - "$WORK/resp" "$2" "$1" <<'PY'
import base64, json, os, sys
resp, out, vol = sys.argv[1:]
body = json.load(open(resp))
assert body["volume_id"] == vol, "answer names another volume"
key = base64.b64decode(body["key"], validate=True)
assert len(key) == 64, f"expected a 512-bit key, got {len(key) * 8} bits"
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as fh:
    fh.write(key.hex())  # no newline: qemu takes the file's bytes as the passphrase
PY
  rm -f "$WORK/resp"
}
fetch_key "$VOL1" "$WORK/key1.hex"
fetch_key "$VOL2" "$WORK/key2.hex"
cmp -s "$WORK/key1.hex" "$WORK/key2.hex" && die "the two volumes got the same key"
ok "both keys fetched (512 bits each, distinct; written to 0600 files, not shown)"

# -- QEMU LUKS image with key 1 ----------------------------------------------------------
# QEMU requires a LUKS passphrase to be valid UTF-8, so 64 raw random bytes
# (format=base64) are refused ("Data from secret sec0 is not valid UTF-8"). As OpenStack
# Nova/os-brick do, the passphrase is the hex encoding of the volume key (512 bits of
# entropy, 128 ASCII characters).
IMG="$WORK/vol1.luks"
SECRET1="secret,id=sec0,file=$WORK/key1.hex,format=raw"
SECRET2="secret,id=sec0,file=$WORK/key2.hex,format=raw"
# qemu-img times PBKDF2 with the thread's CPU clock; on coarse virtual clocks it may
# measure 0 ms and give up ("Unable to get accurate CPU usage"): retry that case only.
for attempt in 1 2 3 4 5 6; do
  rm -f "$IMG"
  if qemu-img create -q -f luks --object "$SECRET1" \
       -o key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts,iter-time=10 "$IMG" 16M \
       >"$WORK/qemu-img.out" 2>&1; then
    break
  fi
  if [ "$attempt" = 6 ] || ! grep -q "Unable to get accurate CPU usage" "$WORK/qemu-img.out"; then
    cat "$WORK/qemu-img.out" >&2
    die "qemu-img create failed"
  fi
done
ok "LUKS image created with key 1 (aes-256-xts, 16 MiB)"

IMG_OPTS="driver=luks,key-secret=sec0,file.filename=$IMG"
qemu-io --object "$SECRET1" --image-opts "$IMG_OPTS" -c 'write -P 0xa5 0 1M' \
  >"$WORK/qemu-write.out" 2>&1 || { cat "$WORK/qemu-write.out" >&2; die "qemu-io write failed"; }
ok "pattern 0xa5 written to the first MiB through LUKS"

qemu-io --object "$SECRET1" --image-opts "$IMG_OPTS" -c 'read -P 0xa5 0 1M' \
  >"$WORK/qemu-read.out" 2>&1 || { cat "$WORK/qemu-read.out" >&2; die "qemu-io read failed"; }
if grep -q "Pattern verification failed" "$WORK/qemu-read.out"; then
  die "pattern verification failed on read-back"
fi
grep -q "^read 1048576/1048576 bytes" "$WORK/qemu-read.out" || die "qemu-io read did not complete"
ok "pattern read back and verified with key 1"

if qemu-io --object "$SECRET2" --image-opts "$IMG_OPTS" -c 'read 0 1M' \
     >"$WORK/qemu-wrong.out" 2>&1; then
  die "key 2 opened the image encrypted with key 1"
fi
grep -qi "invalid password\|cannot read" "$WORK/qemu-wrong.out" \
  || { cat "$WORK/qemu-wrong.out" >&2; die "qemu-io failed with key 2, but not for the key"; }
ok "key 2 cannot open the image (qemu-io: $(head -n1 "$WORK/qemu-wrong.out" | sed 's/^qemu-io: //'))"

# -- delete volume 1: its key is gone ----------------------------------------------------
status=$(api DELETE "/v1/volumes/$VOL1")
expect 204 "$status" "delete volume $VOL1"
ok "volume $VOL1 deleted"
status=$(api POST "/v1/volumes/$VOL1/key")
expect 404 "$status" "fetch key of deleted volume $VOL1"
ok "key of $VOL1 now answers 404 (the image can no longer be opened)"

status=$(api GET /v1/volumes)
expect 200 "$status" "list volumes"
python3 - "$WORK/resp" "$VOL1" "$VOL2" <<'PY'
import json, sys
ids = {v["volume_id"] for v in json.load(open(sys.argv[1]))["volumes"]}
assert sys.argv[2] not in ids and sys.argv[3] in ids, "volume list is wrong"
PY
ok "volume list shows $VOL2 only"

echo "demo finished: all expectations met"
