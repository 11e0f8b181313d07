"""The model weights every LVPNet stream needs, kept in the object store beside the streams.

A stream names its model and weights SHA-256; the archive's software ships those weights in its
zoo.  Copies in the store (`weights/<model>/<sha256>.npz`, the exact bytes the SHA-256 covers) let
a disaster recovery onto another machine or release decode every object even if that release no
longer ships them.  A worker copies the weights before it marks the first LVPNet object archived,
and every decoding process falls back to the store for weights its zoo lacks.
"""

from __future__ import annotations

import hashlib
import logging
import threading

from service.logs import fields
from service.storage.base import InvalidKeyError, ObjectNotFoundError, ObjectStore

LOGGER = logging.getLogger(__name__)
WEIGHTS_PREFIX = "weights/"
_stored: set[tuple[str, str]] = set()  # (store, sha256) known to be in the store, per process
_lock = threading.Lock()


def weights_key(model: str, sha256: str) -> str:
    return f"{WEIGHTS_PREFIX}{model}/{sha256}.npz"


def ensure_stored(store: ObjectStore, model: str, sha256: str) -> None:
    """Put the weights into the store unless they are there (read back and checked once per process)."""
    marker = (store.describe(), sha256)
    with _lock:
        if marker in _stored:
            return
    from lvpnet.zoo import ZOO

    key = weights_key(model, sha256)
    try:
        present = hashlib.sha256(store.get_bytes(key)).hexdigest() == sha256
    except ObjectNotFoundError:
        present = False
    if not present:
        bundle = ZOO.get(model, sha256)
        store.put_bytes(key, bundle.serialized)
        if hashlib.sha256(store.get_bytes(key)).hexdigest() != sha256:
            raise OSError("object store returned different weights than were written")
        LOGGER.info("model weights copied to the object store", extra=fields(model=model, key=key))
    with _lock:
        _stored.add(marker)


def use_store(store: ObjectStore) -> None:
    """Decode with weights from `store` when the zoo does not ship the ones a stream names."""
    from lvpnet.zoo import ZOO

    def fetch(model: str, sha256: str) -> bytes | None:
        key = weights_key(model, sha256)
        try:
            data = store.get_bytes(key)
        except (ObjectNotFoundError, InvalidKeyError):  # streams are input: a name may be no key at all
            return None
        LOGGER.info("model weights loaded from the object store", extra=fields(model=model, key=key))
        return data

    ZOO.set_fallback(fetch)
