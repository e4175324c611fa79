"""HTTP interfaces: the tenant API (and later the admin API), thin over `kms`."""
