"""Open the store a URL names: file:///path or s3://bucket/prefix."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from service.config import Settings
from service.storage.base import ObjectStore


def open_store(url: str, settings: Settings | None = None) -> ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from service.storage.filesystem import FilesystemStore

        return FilesystemStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        from service.storage.s3 import S3Store

        settings = settings or Settings()
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            region=settings.s3_region,
        )
    raise ValueError(f"unsupported storage URL scheme {parsed.scheme!r} (file:// or s3://)")
