"""The `kms` command for the provider's operators."""
