"""Composition root: builds the concrete adapters from settings."""

from __future__ import annotations

import os
from datetime import timedelta

from hsm import Pkcs11Hsm
from kms.clock import Clock, SystemClock
from kms.config import Settings
from kms.db import Database
from kms.passwords import Argon2Parameters
from kms.service import Kms, KmsOptions, read_secret_file


def build_kms(settings: Settings, *, clock: Clock | None = None) -> Kms:
    """Open the database and the token adapter (lazily: nothing touches the token yet)."""
    home = settings.home_dir
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if "SOFTHSM2_CONF" not in os.environ and settings.softhsm_conf.exists():
        # SoftHSM reads its configuration location from the environment at C_Initialize.
        os.environ["SOFTHSM2_CONF"] = str(settings.softhsm_conf)
    pin_file = settings.effective_pin_file
    hsm = Pkcs11Hsm(module_path=settings.effective_pkcs11_module,
                    token_label=settings.hsm_token_label,
                    pin_reader=lambda: read_secret_file(pin_file))
    db = Database(settings.effective_database_url)
    options = KmsOptions(
        key_cache_size=settings.key_cache_size,
        volume_key_cache_seconds=settings.volume_key_cache_seconds,
        notice_days=settings.notice_days,
        operator_max_failures=settings.operator_max_failures,
        operator_session=timedelta(minutes=settings.operator_session_minutes),
        argon2=Argon2Parameters(settings.argon2_time_cost, settings.argon2_memory_kib,
                                settings.argon2_parallelism),
        incompatible_roles=tuple((a, b) for a, b in settings.incompatible_roles),
        audit_data_plane=settings.audit_data_plane,
        exclusive_token=not settings.token_shared_by_databases,
        key_version_max_encryptions=settings.key_version_max_encryptions,
        kek_max_encryptions=settings.kek_max_encryptions,
        kek_rotation_days=settings.kek_rotation_days)
    return Kms(db=db, hsm=hsm, clock=clock or SystemClock(), options=options)
