"""The object store interface.  A `put_*` that returns has made the object durable."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

# Keys are built by the archive, never taken from input; still validated, since UIDs and other
# received values must never be able to name a path outside the store.
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
MAX_KEY_LENGTH = 512

STAGING_PREFIX = "staging/"
OBJECTS_PREFIX = "objects/"


class InvalidKeyError(ValueError):
    pass


class ObjectNotFoundError(KeyError):
    pass


def validate_key(key: str) -> str:
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_PATTERN.match(key):
        raise InvalidKeyError("invalid object key")
    return key


class ObjectStore(ABC):
    @abstractmethod
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store a file's bytes durably.  move=True lets the store take the file (it may be gone)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raises ObjectNotFoundError."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int | None: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete if present."""

    @abstractmethod
    def iter_keys(self, prefix: str) -> Iterator[str]: ...

    @abstractmethod
    def modified_at(self, key: str) -> float | None:
        """When the object was last written (seconds since the epoch), None if absent."""

    def iter_modified(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modified_at) under `prefix`; stores whose listing carries the time override this."""
        for key in self.iter_keys(prefix):
            modified = self.modified_at(key)
            if modified is not None:
                yield key, modified

    def describe(self) -> str:
        return type(self).__name__
