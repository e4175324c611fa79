#!/usr/bin/env bash
# Create (once) a SoftHSM2 token for the KMS under $KMS_HOME (default ./var).
#
# Idempotent: a second run changes nothing. PINs are generated into files of mode
# 0600 under $KMS_HOME/secrets/ and handed to pkcs11-tool through the environment
# (env:VAR), never on a command line, so they never show in `ps`.
set -euo pipefail

KMS_HOME=${KMS_HOME:-./var}
mkdir -p "$KMS_HOME"
KMS_HOME=$(cd "$KMS_HOME" && pwd)
LABEL=${KMS_HSM_TOKEN_LABEL:-kms}
MODULE=${KMS_PKCS11_MODULE:-}
if [ -z "$MODULE" ]; then
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
           /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$m" ]; then MODULE=$m; break; fi
  done
fi
[ -n "$MODULE" ] && [ -f "$MODULE" ] || { echo "setup-token: SoftHSM2 module not found (apt-get install softhsm2)" >&2; exit 1; }
command -v pkcs11-tool >/dev/null || { echo "setup-token: pkcs11-tool not found (apt-get install opensc)" >&2; exit 1; }

umask 077
chmod 0700 "$KMS_HOME"
mkdir -p "$KMS_HOME/softhsm/tokens" "$KMS_HOME/secrets"
chmod 0700 "$KMS_HOME/softhsm" "$KMS_HOME/softhsm/tokens" "$KMS_HOME/secrets"

CONF="$KMS_HOME/softhsm/softhsm2.conf"
if [ ! -f "$CONF" ]; then
  cat >"$CONF" <<CONF
# Written by softhsm-setup/setup-token.sh
directories.tokendir = $KMS_HOME/softhsm/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi
export SOFTHSM2_CONF="$CONF"

new_pin() {  # 32 hex characters from the OS CSPRNG
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n'
}
for f in user.pin so.pin; do
  if [ ! -s "$KMS_HOME/secrets/$f" ]; then
    new_pin >"$KMS_HOME/secrets/$f"
  fi
  chmod 0600 "$KMS_HOME/secrets/$f"
done

if pkcs11-tool --module "$MODULE" --list-token-slots 2>/dev/null | grep -q "token label *: *$LABEL\$"; then
  exit 0
fi
KMS_SETUP_SO_PIN=$(cat "$KMS_HOME/secrets/so.pin")
KMS_SETUP_USER_PIN=$(cat "$KMS_HOME/secrets/user.pin")
export KMS_SETUP_SO_PIN KMS_SETUP_USER_PIN
# SoftHSM always keeps one free slot; --init-token takes the first uninitialised one.
pkcs11-tool --module "$MODULE" --init-token --label "$LABEL" --so-pin env:KMS_SETUP_SO_PIN >/dev/null
pkcs11-tool --module "$MODULE" --token-label "$LABEL" --login --login-type so \
  --so-pin env:KMS_SETUP_SO_PIN --init-pin --pin env:KMS_SETUP_USER_PIN >/dev/null
echo "setup-token: token '$LABEL' created in $KMS_HOME/softhsm/tokens" >&2
