"""Tenant KMS: domain and services. Imports neither FastAPI nor the CLI library."""

__version__ = "0.1.0"
