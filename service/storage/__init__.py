"""Object stores: one interface, a filesystem and an S3 implementation."""

from service.storage.base import InvalidKeyError, ObjectNotFoundError, ObjectStore, validate_key
from service.storage.factory import open_store

__all__ = ["InvalidKeyError", "ObjectNotFoundError", "ObjectStore", "open_store", "validate_key"]
