"""The REST API: STOW-RS, instance status, catalog figures."""
