"""PKCS#11 adapter: knows tokens, keys and mechanisms; nothing of HTTP, tenants or SQL."""

from hsm.adapter import GCM_IV_BYTES, Pkcs11Hsm, TokenInfo, TokenObject
from hsm.errors import (
    HsmAmbiguousKey,
    HsmDecryptFailed,
    HsmDestroyUnconfirmed,
    HsmError,
    HsmKeyNotFound,
    HsmKeyUsageRefused,
    HsmLoginFailed,
    HsmMechanismMissing,
    HsmUnavailable,
)

__all__ = [
    "GCM_IV_BYTES", "Pkcs11Hsm", "TokenInfo", "TokenObject", "HsmAmbiguousKey",
    "HsmDecryptFailed", "HsmDestroyUnconfirmed", "HsmError", "HsmKeyNotFound",
    "HsmKeyUsageRefused",
    "HsmLoginFailed", "HsmMechanismMissing", "HsmUnavailable",
]
