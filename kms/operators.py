"""Operators of the provider (SecNumCloud 9.5, 9.6 f, 10.3): Argon2id password + TOTP,
lockout after consecutive failures, short-lived admin sessions.

Every login failure — unknown user, wrong password, wrong or replayed TOTP code, locked
account, corrupted stored hash — raises the same `LoginFailed`, after the same
Argon2 work, so that the answer reveals neither the user nor the failed factor.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import pyotp
from sqlalchemy import update
from sqlalchemy.orm import Session

from kms.audit import AuditJournal
from kms.clock import Clock
from kms.db import Database
from kms.errors import AlreadyExists, LoginFailed, NotFound, Unauthenticated
from kms.models import Operator, OperatorSession
from kms.passwords import Passwords
from kms.sealing import Sealer
from kms.validation import check_identifier

log = logging.getLogger("kms.operators")
TOTP_ISSUER = "Tenant KMS"
_DUMMY_DIGEST = hashlib.sha256(b"no such session").digest()


@dataclass(frozen=True)
class NewOperator:
    username: str
    totp_uri: str

    def __repr__(self) -> str:
        return f"NewOperator(username={self.username!r}, totp_uri=<hidden>)"


@dataclass(frozen=True)
class AdminSession:
    token: str
    expires_at: datetime

    def __repr__(self) -> str:
        return f"AdminSession(token=<hidden>, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True)
class OperatorCaller:
    username: str
    session_id: str


def _totp_aad(username: str) -> bytes:
    return f"kms:v1|operator={username}|kind=totp".encode()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class OperatorService:
    def __init__(self, *, db: Database, clock: Clock, passwords: Passwords, sealer: Sealer,
                 audit: AuditJournal, max_failures: int = 5,
                 session_ttl: timedelta = timedelta(minutes=15)):
        self._db, self._clock, self._passwords, self._sealer = db, clock, passwords, sealer
        self._audit = audit
        self._max_failures = max_failures
        self._session_ttl = session_ttl

    def create(self, username: str, password: str) -> NewOperator:
        """Create an operator; returns the TOTP provisioning URI, shown once."""
        check_identifier(username, field="username")
        password_hash = self._passwords.hash(password)
        seed = pyotp.random_base32()
        with self._db.write() as s:
            if s.get(Operator, username) is not None:
                raise AlreadyExists("operator exists", what="operator")
            s.add(Operator(username=username, password_hash=password_hash,
                           totp_sealed=self._sealer.seal(s, seed.encode(),
                                                         aad=_totp_aad(username)),
                           last_totp_step=0, failed_attempts=0, created_at=self._clock.now()))
            self._audit.record(s, action="operator.create", tenant_id=None,
                               object=f"operator:{username}")
        uri = pyotp.TOTP(seed).provisioning_uri(name=username, issuer_name=TOTP_ISSUER)
        return NewOperator(username, uri)

    def set_password(self, username: str, password: str) -> None:
        password_hash = self._passwords.hash(password)
        with self._db.write() as s:
            op = self._get(s, username)
            op.password_hash = password_hash
            self._revoke_sessions(s, username, self._clock.now())
            self._audit.record(s, action="operator.passwd", tenant_id=None,
                               object=f"operator:{username}")

    def unlock(self, username: str) -> None:
        with self._db.write() as s:
            op = self._get(s, username)
            op.failed_attempts, op.locked_at = 0, None
            self._audit.record(s, action="operator.unlock", tenant_id=None,
                               object=f"operator:{username}")

    def status(self, username: str) -> dict[str, object]:
        with self._db.read() as s:
            op = self._get(s, username)
            return {"username": op.username, "locked": op.locked_at is not None,
                    "failed_attempts": op.failed_attempts}

    def login(self, username: str, password: str, totp_code: str) -> AdminSession:
        """Check password and TOTP; return a short-lived session token.

        Raises LoginFailed for every failure, identically. The Argon2 work runs outside
        any database transaction, so that failed logins cannot hold the write lock."""
        password = password if isinstance(password, str) else ""
        with self._db.read() as s:
            op = s.get(Operator, username) if isinstance(username, str) else None
            stored = op.password_hash if op is not None else None
        if stored is None:
            self._passwords.verify_dummy(password)
        password_ok = stored is not None and self._passwords.verify(stored, password)
        upgraded = (self._passwords.hash(password)
                    if password_ok and self._passwords.needs_rehash(stored or "") else None)
        now = self._clock.now()
        session: AdminSession | None = None
        with self._db.write() as s:
            op = s.get(Operator, username, with_for_update=True) if stored is not None else None
            if op is None or op.password_hash != stored:  # unknown, or changed meanwhile
                self._audit.record(s, action="operator.login", tenant_id=None,
                                   object="operator:<unknown>", outcome="failure",
                                   actor="anonymous")
            elif self._check(s, op, password_ok, totp_code, now):
                op.failed_attempts, op.last_login_at = 0, now
                if upgraded is not None:
                    op.password_hash = upgraded
                secret = secrets.token_urlsafe(32)
                session_id = f"os-{secrets.token_hex(8)}"
                expires = now + self._session_ttl
                s.add(OperatorSession(id=session_id, username=op.username,
                                      token_digest=_digest(secret), created_at=now,
                                      expires_at=expires))
                session = AdminSession(f"{session_id}.{secret}", expires)
                self._audit.record(s, action="operator.login", tenant_id=None,
                                   object=f"operator:{op.username}:session={session_id}",
                                   actor=f"operator:{op.username}")
        if session is None:  # the failure and its event are committed first
            raise LoginFailed("login failed")
        return session

    def _check(self, s: Session, op: Operator, password_ok: bool, totp_code: str,
               now: datetime) -> bool:
        """Both factors, or count a failure (and lock at the threshold), audited."""
        step = self._totp_step(s, op, totp_code, now) if password_ok else None
        if op.locked_at is None and password_ok and step is not None:
            op.last_totp_step = step
            return True
        self._audit.record(s, action="operator.login", tenant_id=None,
                           object=f"operator:{op.username}", outcome="failure",
                           actor=f"operator:{op.username}")
        if op.locked_at is None:
            op.failed_attempts += 1
            if op.failed_attempts >= self._max_failures:
                op.locked_at = now
                self._revoke_sessions(s, op.username, now)
                log.warning("operator locked", extra={"operator": op.username})
                self._audit.record(s, action="operator.lock", tenant_id=None,
                                   object=f"operator:{op.username}", actor="system:lockout")
        return False

    def _totp_step(self, s: Session, op: Operator, code: str, now: datetime) -> int | None:
        """The accepted time step, or None; a code is accepted once (no replay)."""
        if not isinstance(code, str) or not code.isdigit() or len(code) != 6:
            return None
        seed = self._sealer.unseal(s, op.totp_sealed, aad=_totp_aad(op.username)).decode()
        totp = pyotp.TOTP(seed)
        current = int(now.timestamp()) // totp.interval
        for step in (current - 1, current, current + 1):
            expected = totp.generate_otp(step)
            if hmac.compare_digest(expected, code) and step > op.last_totp_step:
                return step
        return None

    def authenticate(self, token: str) -> OperatorCaller:
        session_id, _, secret = token.partition(".")
        now = self._clock.now()
        with self._db.read() as s:
            row = s.get(OperatorSession, session_id) if session_id.startswith("os-") else None
            ok = hmac.compare_digest(_digest(secret), row.token_digest if row else _DUMMY_DIGEST)
            if row is None or not ok or row.revoked_at is not None or row.expires_at <= now:
                raise Unauthenticated("invalid session")
            op = s.get(Operator, row.username)
            if op is None or op.locked_at is not None:
                raise Unauthenticated("invalid session")
            return OperatorCaller(row.username, row.id)

    def logout(self, caller: OperatorCaller) -> None:
        with self._db.write() as s:
            row = s.get(OperatorSession, caller.session_id)
            if row is not None:
                row.revoked_at = self._clock.now()
                self._audit.record(s, action="operator.logout", tenant_id=None,
                                   object=f"operator:{caller.username}:session={row.id}",
                                   actor=f"operator:{caller.username}")

    @staticmethod
    def _revoke_sessions(s: Session, username: str, now: datetime) -> None:
        """A new password or a lockout ends every open session of the operator."""
        s.execute(update(OperatorSession).where(OperatorSession.username == username,
                                                OperatorSession.revoked_at.is_(None))
                  .values(revoked_at=now))

    @staticmethod
    def _get(s: Session, username: str) -> Operator:
        check_identifier(username, field="username")
        op = s.get(Operator, username)
        if op is None:
            raise NotFound("no such operator", what="operator")
        return op

