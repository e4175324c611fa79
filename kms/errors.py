"""Domain errors. Each has a stable `code`; HTTP statuses live in `api.problems`.

Messages are safe to show and to log: they never contain key material, plaintext,
tokens, PINs or passwords. Details for clients are rendered per language by the API.
"""

from __future__ import annotations

from typing import Any


class KmsError(Exception):
    """Base of the domain's errors; never raised directly."""

    code = "internal_error"

    def __init__(self, message: str = "", **params: Any):
        super().__init__(message or self.code)
        self.params = params


class InvalidRequest(KmsError):
    code = "invalid_request"


class Unauthenticated(KmsError):
    code = "unauthenticated"


class LoginFailed(Unauthenticated):
    """Wrong username, password or TOTP code, or a locked account: never says which."""

    code = "login_failed"


class Forbidden(KmsError):
    code = "forbidden"


class NotFound(KmsError):
    code = "not_found"


class AlreadyExists(KmsError):
    code = "already_exists"


class TenantInNotice(KmsError):
    code = "tenant_in_notice"


class TenantSuspended(KmsError):
    code = "tenant_suspended"


class TenantErased(KmsError):
    code = "tenant_erased"


class DecryptionFailed(KmsError):
    """Every authentication failure of a ciphertext, with no hint of which check failed."""

    code = "decryption_failed"


class KeyDisabled(KmsError):
    code = "key_disabled"


class KeyVersionUnavailable(KmsError):
    code = "key_version_unavailable"


class ServiceUnavailable(KmsError):
    """The security token or the database cannot be reached; retry later."""

    code = "service_unavailable"


class KeyIntegrityError(KmsError):
    """A stored wrapped key does not unwrap under its tenant's KEK and place (AAD):
    the database row was altered or moved. Never a client's fault."""

    code = "key_integrity_error"


class InvalidConfiguration(KmsError):
    code = "invalid_configuration"


class InvalidState(KmsError):
    """The operation does not apply to the tenant's current state."""

    code = "invalid_state"


class IncompatibleRoles(InvalidRequest):
    """The identity already holds a role that the configuration declares incompatible."""

    code = "incompatible_roles"
