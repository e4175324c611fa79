"""Errors raised by the PKCS#11 adapter.

Every python-pkcs11 exception is translated here into one of these, so that callers
never depend on the binding. Messages never carry key material, PINs or data.
"""

from __future__ import annotations


class HsmError(Exception):
    """Base of the adapter's errors; never raised directly."""


class HsmUnavailable(HsmError):
    """The token cannot be reached right now (lost session, device error, missing
    token). The adapter has already tried to re-initialise once; callers answer 503."""


class HsmMechanismMissing(HsmError):
    """The start-up self-test found a mechanism the service needs missing or broken."""


class HsmKeyNotFound(HsmError):
    """No object with this CKA_ID exists in the token."""


class HsmAmbiguousKey(HsmError):
    """Several objects share one CKA_ID: the adapter refuses to guess."""


class HsmDecryptFailed(HsmError):
    """AES-GCM authentication failed: wrong key, wrong AAD, or tampered data."""


class HsmDestroyUnconfirmed(HsmError):
    """After destroy, a fresh search still finds the object (or the destroy was refused)."""


class HsmLoginFailed(HsmError):
    """The user PIN was refused or the token with this label does not exist."""


class HsmKeyUsageRefused(HsmError):
    """A key was asked for an operation outside its single purpose (usage separation)."""
