"""SQLAlchemy models. Only wrapped key blobs are stored, never plaintext key material."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; a naive datetime is refused at bind time."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("naive datetime refused")
        utc: datetime = value.astimezone(timezone.utc)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    name_key: Mapped[str] = mapped_column(String(800), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    # Bumped at every state change: cached plaintext keys of an older epoch are dropped.
    epoch: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Kek(Base):
    """A generation of a tenant's key-encryption key, held in the token."""

    __tablename__ = "keks"
    __table_args__ = (UniqueConstraint("tenant_id", "generation"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    cka_id: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(256))
    # active (wraps new keys) → retiring (being rewrapped away) → destroyed
    state: Mapped[str] = mapped_column(String(16), default="active")
    encryptions: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    destroyed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Principal(Base):
    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    token_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Volume(Base):
    __tablename__ = "volumes"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    volume_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    cipher: Mapped[str] = mapped_column(String(64))
    key_bits: Mapped[int] = mapped_column(Integer)
    kek_generation: Mapped[int] = mapped_column(Integer)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AppKey(Base):
    __tablename__ = "app_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    latest_version: Mapped[int] = mapped_column(Integer, default=1)
    min_decryption_version: Mapped[int] = mapped_column(Integer, default=1)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AppKeyVersion(Base):
    __tablename__ = "app_key_versions"

    key_id: Mapped[int] = mapped_column(ForeignKey("app_keys.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    kek_generation: Mapped[int] = mapped_column(Integer)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default="active")
    # High-water mark of encryptions reserved under this version (also kept in the token).
    encryptions: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    state_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class DeletedVolume(Base):
    """A deleted volume: its wrapped key is gone from the live database, but backups may
    still hold it until the KEK generation that wrapped it is destroyed (11.9)."""

    __tablename__ = "deleted_volumes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    volume_id: Mapped[str] = mapped_column(String(128))
    kek_generation: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    erasure_completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ServiceKey(Base):
    """Service keys in the token (kms init): audit HMAC, signing, secrets KEK."""

    __tablename__ = "service_keys"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    cka_id: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


def service_key_id(session: Any, purpose: str) -> bytes:
    """CKA_ID of a service key; KeyIntegrityError if `kms init` has not created it."""
    from kms.errors import KeyIntegrityError

    row = session.get(ServiceKey, purpose)
    if row is None:
        raise KeyIntegrityError(f"no {purpose} service key: run `kms init`")
    try:
        return bytes.fromhex(row.cka_id)
    except (TypeError, ValueError):
        raise KeyIntegrityError(f"the {purpose} service key's id is not hexadecimal") from None


class Notice(Base):
    """An end-of-contract notice (19.4): the signed document and its deadline."""

    __tablename__ = "notices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), index=True)
    served_at: Mapped[datetime] = mapped_column(UTCDateTime())
    effective_at: Mapped[datetime] = mapped_column(UTCDateTime())
    contract_end: Mapped[str | None] = mapped_column(String(10), nullable=True)
    document: Mapped[bytes] = mapped_column(LargeBinary)  # canonical JSON
    signature: Mapped[bytes] = mapped_column(LargeBinary)  # DER ECDSA P-256 / SHA-256
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Erasure(Base):
    """Progress of one tenant's erasure: persisted steps and the outcome."""

    __tablename__ = "erasures"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    notice_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24), default="pending")
    step: Mapped[str] = mapped_column(String(32), default="start")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    destroyed_ids: Mapped[str] = mapped_column(String, default="[]")  # JSON list of hex
    deleted_counts: Mapped[str] = mapped_column(String, default="{}")  # JSON object
    absence_check: Mapped[str | None] = mapped_column(String, nullable=True)  # JSON


class Certificate(Base):
    """The signed erasure certificate; at most one per tenant."""

    __tablename__ = "erasure_certificates"

    tenant_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Operator(Base):
    """A provider operator: Argon2id password hash and a sealed TOTP seed, never secrets."""

    __tablename__ = "operators"

    username: Mapped[str] = mapped_column(String(128), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(512))
    totp_sealed: Mapped[bytes] = mapped_column(LargeBinary)
    last_totp_step: Mapped[int] = mapped_column(Integer, default=0)
    failed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    locked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OperatorSession(Base):
    """A short-lived admin-API session; only the SHA-256 of its secret is stored."""

    __tablename__ = "operator_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(ForeignKey("operators.username"), index=True)
    token_digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class AuditEvent(Base):
    """One journal event. Never key material, plaintext, password or token."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ts: Mapped[str] = mapped_column(String(40), index=True)  # ISO 8601 UTC, microseconds
    actor: Mapped[str] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(64))
    object: Mapped[str] = mapped_column(String(300), default="")
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(128))
    prev_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    # The journal segment whose MAC key (derived in the token from the audit key) made
    # `mac`; NULL: `mac` is an HMAC by the audit key itself (events before segments).
    mac_key: Mapped[str | None] = mapped_column(String(40), nullable=True)


class AuditHead(Base):
    """The last event's sequence and link hash, HMAC'd by the token's audit key on every
    commit: detects a truncated tail."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """After a purge: where the kept chain starts, HMAC'd."""

    __tablename__ = "audit_checkpoint"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_seq: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str] = mapped_column(String(64))
    purged_before: Mapped[str] = mapped_column(String(40))
