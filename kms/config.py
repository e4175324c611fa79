"""Configuration: environment variables `KMS_*` or a TOML file (`--config kms.toml`).

Nothing is read at import time; composition roots call `load_settings()`.
Secrets are never settings values: only paths to files that hold them.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from kms.errors import InvalidConfiguration

MIN_NOTICE_DAYS = 21
_SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KMS_", extra="forbid")

    home: Path = Field(default=Path("var"), description="data directory")
    database_url: str | None = None
    pkcs11_module: str | None = None
    hsm_token_label: str = "kms"
    hsm_pin_file: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    admin_port: int = Field(default=8444, ge=1, le=65535)
    max_request_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    notice_days: int = MIN_NOTICE_DAYS
    key_cache_size: int = Field(default=10_000, ge=0)
    # How long a released volume key may stay in memory (0: not kept at all).
    volume_key_cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    erasure_interval_seconds: float = Field(default=60.0, gt=0)
    # Key usage limits (SP 800-38D: < 2^32 random-IV encryptions per key) and renewal.
    key_version_max_encryptions: int = Field(default=2**30, ge=1, le=2**32 - 1)
    kek_max_encryptions: int = Field(default=2**30, ge=1, le=2**32 - 1)
    kek_rotation_days: int = Field(default=90, ge=1)
    # Audit journal (12.6-12.8): kept at least six months; data-plane events on by default.
    audit_retention_days: int = Field(default=183, ge=183)
    audit_data_plane: bool = True
    # Several databases on one token (test suites only): the token can then not tell a
    # replaced journal from another database's.
    token_shared_by_databases: bool = False
    log_file: Path | None = None
    # TLS (10.2): on by default; plain HTTP only with insecure_http on loopback.
    insecure_http: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    admin_host: str = "127.0.0.1"
    admin_allow_remote: bool = False
    # Operators (9.5, 9.6 f, 10.3)
    operator_max_failures: int = Field(default=5, ge=1, le=100)
    operator_session_minutes: int = Field(default=15, ge=1, le=24 * 60)
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8 * 1024)
    argon2_parallelism: int = Field(default=4, ge=1)
    # Separation of duties (9.3 f): pairs of roles one identity may not hold together.
    incompatible_roles: list[tuple[str, str]] = Field(
        default=[("tenant-admin", "app"), ("tenant-admin", "hypervisor")])
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v.upper()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("sqlite:///", "postgresql+psycopg://")):
            raise ValueError("database_url must be sqlite:///PATH or postgresql+psycopg://…")
        try:
            url = make_url(v)
        except (ValueError, ArgumentError):
            # Not the parser's message: it quotes the part it failed on, which may be
            # the password (a "@" or ":" in it moves where the host and port seem to be).
            raise ValueError("database_url is not a valid URL (a password with @, : or / "
                             "must be percent-encoded)") from None
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError("database_url: SQLite needs a file (sqlite:///PATH)")
        return v

    @field_validator("notice_days")
    @classmethod
    def _notice_upward_only(cls, v: int) -> int:
        if v < MIN_NOTICE_DAYS:
            raise ValueError(f"notice_days must be at least {MIN_NOTICE_DAYS} "
                             "(it may only be raised)")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file given with --config.
        return (env_settings, init_settings)

    # -- derived paths --------------------------------------------------------------

    @property
    def home_dir(self) -> Path:
        return self.home.resolve()

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'kms.sqlite3'}"

    @property
    def effective_pin_file(self) -> Path:
        return self.hsm_pin_file or self.home_dir / "secrets" / "user.pin"

    @property
    def effective_tls_cert(self) -> Path:
        return self.tls_cert or self.home_dir / "tls" / "server.pem"

    @property
    def effective_tls_key(self) -> Path:
        return self.tls_key or self.home_dir / "tls" / "server.key"

    @property
    def tls_ca(self) -> Path:
        return self.home_dir / "tls" / "ca.pem"

    @property
    def softhsm_conf(self) -> Path:
        return self.home_dir / "softhsm" / "softhsm2.conf"

    @property
    def effective_pkcs11_module(self) -> str:
        if self.pkcs11_module:
            return self.pkcs11_module
        for candidate in _SOFTHSM_CANDIDATES:
            if os.path.exists(candidate):
                return candidate
        raise InvalidConfiguration("no PKCS#11 module: set KMS_PKCS11_MODULE")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings from the TOML file (if any), then the environment, then overrides.

    Raises InvalidConfiguration with a one-line message for any bad value."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as fh:
                values = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidConfiguration(f"cannot read config file {config_file}: {exc}") from exc
    try:
        settings = Settings(**values)
        given = {k: v for k, v in overrides.items() if v is not None}
        if given:
            # Command-line options win over the environment: validate the merged values
            # with the environment out of the way.
            settings = _Explicit(**{**settings.model_dump(), **given})
        return settings
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else None
        if first is not None:
            loc = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            raise InvalidConfiguration(f"invalid setting {loc}: {first.get('msg')}") from None
        raise InvalidConfiguration(f"invalid settings: {exc}") from None


class _Explicit(Settings):
    """Settings validated from explicit values only (no environment, no file)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)
