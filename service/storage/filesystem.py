"""Filesystem object store: write to a temporary name, fsync, atomic rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from service.storage.base import ObjectNotFoundError, ObjectStore, validate_key


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore(ObjectStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # belt and braces: the key pattern already forbids this
            raise ObjectNotFoundError(key)
        return path

    def _temporary(self, target: Path) -> Path:
        # Dot-names never match the key pattern, so half-written files are never listed
        return target.parent / f".tmp-{uuid.uuid4().hex}"

    def _publish(self, temporary: Path, target: Path) -> None:
        os.replace(temporary, target)
        _fsync_dir(target.parent)

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                _fsync_file(path)
                os.replace(path, target)  # atomic, and no copy: same filesystem
                _fsync_dir(target.parent)
                return
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: another filesystem, fall back to copying
                    raise
        temporary = self._temporary(target)
        try:
            with path.open("rb") as source, temporary.open("wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
                sink.flush()
                os.fsync(sink.fileno())
            self._publish(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        if move:
            path.unlink()

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._temporary(target)
        try:
            with temporary.open("wb") as sink:
                sink.write(data)
                sink.flush()
                os.fsync(sink.fileno())
            self._publish(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(key) from exc

    def local_path(self, key: str) -> Path:
        """The file holding `key` (filesystem stores only): lets readers avoid a copy."""
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def modified_at(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def iter_keys(self, prefix: str) -> Iterator[str]:
        # Walk only below the prefix's directory: listing staging/ must not visit every object
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key
