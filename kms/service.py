"""The KMS as one object: the services, sharing one database, one token and one clock.

Built only by the composition roots (`cli.wiring`) and tests; the API receives it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hsm import HsmError, HsmMechanismMissing, HsmUnavailable, Pkcs11Hsm
from kms.access import AccessService
from kms.appkeys import AppKeyService
from kms.audit import AUDIT_KEY_LABEL, AuditJournal, VerifyResult
from kms.audit_batch import AuditBatcher
from kms.clock import Clock, require_aware
from kms.config import MIN_NOTICE_DAYS
from kms.db import Database
from kms.erasure import ErasureRunner
from kms.errors import InvalidConfiguration, InvalidRequest, InvalidState, ServiceUnavailable
from kms.kekrotation import KekRotation
from kms.keyring import Keyring
from kms.lifecycle import LifecycleService
from kms.models import ServiceKey
from kms.operators import OperatorService
from kms.passwords import Argon2Parameters, Passwords
from kms.principals import DEFAULT_INCOMPATIBLE_ROLES, PrincipalService
from kms.sealing import Sealer
from kms.signing import ServiceSigner
from kms.tenants import TenantService, load_tenant
from kms.transit import TransitService
from kms.usage import UsageLimiter
from kms.validation import check_identifier
from kms.volumes import VolumeService

SERVICE_KEY_LABELS = {"audit-hmac": AUDIT_KEY_LABEL,
                      "signing": "kms/service/signing",
                      "secrets-kek": "kms/service/secrets-kek"}


@dataclass(frozen=True)
class KmsOptions:
    key_cache_size: int = 10_000
    volume_key_cache_seconds: float = 60.0
    notice_days: int = MIN_NOTICE_DAYS
    operator_max_failures: int = 5
    operator_session: timedelta = timedelta(minutes=15)
    argon2: Argon2Parameters = field(default_factory=Argon2Parameters)
    incompatible_roles: tuple[tuple[str, str], ...] = DEFAULT_INCOMPATIBLE_ROLES
    audit_data_plane: bool = True
    key_version_max_encryptions: int = 2**30
    kek_max_encryptions: int = 2**30
    kek_rotation_days: int = 90
    # One journal per token (what `kms serve` and the CLI run with: Settings): the token
    # then tells when a database lost its journal and `kms init` made a new one. Off for
    # test suites that run several databases on one token.
    exclusive_token: bool = False


class Kms:
    def __init__(self, *, db: Database, hsm: Pkcs11Hsm, clock: Clock,
                 options: KmsOptions | None = None):
        opts = options or KmsOptions()
        if opts.notice_days < MIN_NOTICE_DAYS:
            raise InvalidConfiguration(f"notice_days must be at least {MIN_NOTICE_DAYS} "
                                       "(it may only be raised)")
        self.db, self.hsm, self.clock = db, hsm, clock
        self.keyring = Keyring(hsm=hsm, clock=clock, kek_max_encryptions=opts.kek_max_encryptions)
        self.audit = AuditJournal(hsm=hsm, clock=clock, exclusive_token=opts.exclusive_token)
        self.audit_batcher = AuditBatcher(db=db, journal=self.audit,
                                          enabled=opts.audit_data_plane)
        journal = self.audit
        self.tenants = TenantService(db=db, keyring=self.keyring, clock=clock, audit=journal)
        self.principals = PrincipalService(db=db, clock=clock, audit=journal,
                                           incompatible_roles=opts.incompatible_roles)
        rotation_period = timedelta(days=opts.kek_rotation_days)
        self.volumes = VolumeService(db=db, keyring=self.keyring, clock=clock,
                                     batcher=self.audit_batcher,
                                     rotation_period=rotation_period, audit=journal,
                                     cache_size=opts.key_cache_size,
                                     cache_seconds=opts.volume_key_cache_seconds)
        self.appkeys = AppKeyService(db=db, keyring=self.keyring, clock=clock, audit=journal)
        self.limiter = UsageLimiter(hsm=hsm, cap=opts.key_version_max_encryptions)
        self.transit = TransitService(db=db, keyring=self.keyring, keys=self.appkeys,
                                      limiter=self.limiter, cache_size=opts.key_cache_size,
                                      batcher=self.audit_batcher, audit=journal)
        self.signer = ServiceSigner(hsm=hsm)
        self.lifecycle = LifecycleService(db=db, signer=self.signer, clock=clock,
                                          notice_days=opts.notice_days,
                                          on_state_change=self.drop_cached, audit=journal)
        self.erasure = ErasureRunner(db=db, hsm=hsm, signer=self.signer, clock=clock,
                                     drop_cached=self.drop_cached, audit=journal)
        self.kek_rotation = KekRotation(db=db, hsm=hsm, keyring=self.keyring, clock=clock,
                                        period=rotation_period, audit=journal)
        self.sealer = Sealer(hsm=hsm)
        self.operators = OperatorService(db=db, clock=clock, passwords=Passwords(opts.argon2),
                                         sealer=self.sealer, audit=journal,
                                         max_failures=opts.operator_max_failures,
                                         session_ttl=opts.operator_session)
        self.access = AccessService(db=db)

    def __repr__(self) -> str:
        return f"Kms(db={self.db!r}, hsm={self.hsm!r})"

    def drop_cached(self, tenant_id: str) -> None:
        """Forget every plaintext key of the tenant held in this process (its state
        changed)."""
        self.transit.drop_cached(tenant_id)
        self.volumes.drop_cached(tenant_id)

    def sweep_caches(self) -> int:
        """Forget expired keys and those of tenants whose state changed in another
        process; returns how many were dropped."""
        return self.transit.sweep_cache() + self.volumes.sweep_cache()

    def initialize(self) -> dict[str, str]:
        """Idempotent `kms init`: schema, token self-test, service keys.

        Returns {purpose: CKA_ID hex} of the service keys. Raises HsmMechanismMissing if
        the token lacks a mechanism, ServiceUnavailable if it cannot be reached."""
        self.db.create_schema()
        self.self_test()
        out: dict[str, str] = {}
        with self.db.write() as s:
            for purpose, label in SERVICE_KEY_LABELS.items():
                row = s.get(ServiceKey, purpose)
                if row is None:
                    if purpose == "audit-hmac":
                        self.audit.refuse_second_journal()
                    generate = {"audit-hmac": self.hsm.generate_hmac_key,
                                "signing": self.hsm.generate_signing_key,
                                "secrets-kek": self.hsm.generate_aes_kek}[purpose]
                    cka_id = generate(label=label)
                    row = ServiceKey(purpose=purpose, cka_id=cka_id.hex(), label=label,
                                     created_at=self.clock.now())
                    s.add(row)
                    s.flush()
                    self.audit.record(s, action="service.key_created", tenant_id=None,
                                      object=f"service-key:{purpose}:{row.cka_id}")
                out[purpose] = row.cka_id
        return out

    def audit_export(self, *, tenant_id: str | None = None,
                     since: datetime | None = None) -> list[dict[str, Any]]:
        if tenant_id is not None:
            check_identifier(tenant_id, field="tenant_id")
        with self.db.read() as s:
            if tenant_id is not None:
                load_tenant(s, tenant_id)  # NotFound for a tenant that never existed
            return list(self.audit.export(s, tenant_id=tenant_id, since=since))

    def audit_verify(self) -> VerifyResult:
        anchor = self.audit.anchor_before_snapshot(self.db)
        with self.db.read() as s:
            return self.audit.verify(s, anchor=anchor)

    def audit_purge(self, *, before: datetime, retention: timedelta) -> int:
        """Purge events older than `before`; refuses anything younger than the retention."""
        before = require_aware(before)
        if before > self.clock.now() - retention:
            raise InvalidRequest(f"events younger than the retention ({retention.days} days) "
                                 "cannot be purged", field="before")
        # Purging trusts each event's time: only a journal that verifies is purged (an
        # edited `ts` would otherwise delete recent events and hide the edit), and it is
        # verified inside the purge's own write transaction, which holds the write lock:
        # no edit can land between the check and the deletion.
        anchor = self.audit.anchor_before_snapshot(self.db)
        with self.db.write() as s:
            check = self.audit.verify(s, anchor=anchor)
            if not check.ok:
                raise InvalidState(f"the journal does not verify (first bad sequence "
                                   f"{check.first_bad_seq}: {check.reason}): purge refused")
            # The retention counts back from the journal's own newest event as well as
            # from this process's clock, whichever is earlier: a clock moved forward
            # (faketime) does not make recent events old.
            newest = self.audit.newest_time(s)
            if newest is not None and before > newest - retention:
                raise InvalidRequest(f"events younger than the retention ({retention.days} "
                                     "days, counted from the newest event) cannot be purged",
                                     field="before")
            n = self.audit.purge(s, before=before)
            self.audit.record(s, action="audit.purge", tenant_id=None,
                              object=f"audit:before={before.isoformat()}:deleted={n}")
            return n

    def service_public_key_pem(self) -> str:
        with self.db.read() as s:
            return self.signer.public_key_pem(s)

    def self_test(self) -> None:
        try:
            self.hsm.self_test()
        except HsmUnavailable as exc:
            raise ServiceUnavailable("the security token is unavailable") from exc
        except HsmMechanismMissing:
            raise

    def ready(self) -> dict[str, bool]:
        token_ok = True
        try:
            self.hsm.token_info()
        except HsmError:
            token_ok = False
        return {"token": token_ok, "database": self.db.ping()}

    def now(self) -> datetime:
        return self.clock.now()

    def close(self) -> None:
        self.hsm.close()
        self.db.dispose()


def read_secret_file(path: os.PathLike[str] | str) -> str:
    """Read a PIN/secret file; refuse one readable by group or others."""
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise PermissionError(f"{path} must not be readable by group or others (chmod 600)")
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()
