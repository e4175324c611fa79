"""Who is calling: an authenticated tenant principal. Tenant scoping hangs off this."""

from __future__ import annotations

from dataclasses import dataclass

from kms.errors import Forbidden

ROLE_TENANT_ADMIN = "tenant-admin"
ROLE_HYPERVISOR = "hypervisor"
ROLE_APP = "app"
ROLES = (ROLE_TENANT_ADMIN, ROLE_HYPERVISOR, ROLE_APP)


@dataclass(frozen=True)
class Caller:
    principal_id: str
    tenant_id: str
    role: str
    tenant_epoch: int

    @property
    def actor(self) -> str:
        return f"principal:{self.principal_id}"

    def require(self, *roles: str) -> None:
        """Raise Forbidden unless the caller holds one of `roles`."""
        if self.role not in roles:
            raise Forbidden("this role may not perform this operation", role=self.role)
