"""Alembic migrations of the KMS schema (SQLite and PostgreSQL)."""
