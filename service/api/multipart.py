"""Incremental multipart/related parser: parts stream to files, never whole into memory, and a
part over the size limit is refused as soon as it crosses it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    pass


class PartTooLarge(Exception):
    pass


@dataclass
class Part:
    headers: dict[str, str]
    path: Path
    size: int = 0


@dataclass
class MultipartRelatedParser:
    boundary: bytes
    directory: Path
    max_part_bytes: int
    parts: list[Part] = field(default_factory=list)
    _buffer: bytearray = field(default_factory=bytearray)
    _state: str = "preamble"  # preamble | headers | body | done
    _file: object | None = None

    def __post_init__(self) -> None:
        self._delimiter = b"\r\n--" + self.boundary
        # The first delimiter may come without the leading CRLF (no preamble)
        self._buffer.extend(b"\r\n")

    def feed(self, chunk: bytes) -> None:
        self._buffer.extend(chunk)
        while self._step():
            pass

    def close(self) -> list[Part]:
        if self._state != "done":
            self.discard()
            raise MultipartError("multipart body ended before its closing delimiter")
        return self.parts

    def discard(self) -> None:
        self._close_file()
        for part in self.parts:
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
            self._file = None

    def _step(self) -> bool:
        if self._state == "preamble":
            index = self._buffer.find(self._delimiter)
            if index < 0:
                keep = len(self._delimiter)
                del self._buffer[: max(0, len(self._buffer) - keep)]
                return False
            del self._buffer[: index + len(self._delimiter)]
            self._state = "after-delimiter"
            return True
        if self._state == "after-delimiter":
            if len(self._buffer) < 2:
                return False
            if self._buffer[:2] == b"--":
                self._state = "done"
                self._buffer.clear()
                return False
            end = self._buffer.find(b"\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("malformed delimiter line")
                return False
            del self._buffer[: end + 2]  # transport padding after the boundary
            self._state = "headers"
            return True
        if self._state == "headers":
            end = self._buffer.find(b"\r\n\r\n")
            if self._buffer.startswith(b"\r\n"):
                end, skip = 0, 2  # a part without headers
            elif end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("part headers too long")
                return False
            else:
                skip = 4
            headers: dict[str, str] = {}
            for line in bytes(self._buffer[:end]).decode("latin-1").split("\r\n"):
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            del self._buffer[: end + skip]
            fd, name = tempfile.mkstemp(prefix=".stow-", suffix=".dcm", dir=self.directory)
            self._file = os.fdopen(fd, "wb")
            self.parts.append(Part(headers, Path(name)))
            self._state = "body"
            return True
        if self._state == "body":
            index = self._buffer.find(self._delimiter)
            if index < 0:
                # Everything but a possible partial delimiter at the end is body
                safe = len(self._buffer) - (len(self._delimiter) - 1)
                if safe > 0:
                    self._write(bytes(self._buffer[:safe]))
                    del self._buffer[:safe]
                return False
            self._write(bytes(self._buffer[:index]))
            del self._buffer[: index + len(self._delimiter)]
            self._close_file()
            self._state = "after-delimiter"
            return True
        return False

    def _write(self, data: bytes) -> None:
        part = self.parts[-1]
        part.size += len(data)
        if part.size > self.max_part_bytes:
            raise PartTooLarge()
        self._file.write(data)  # type: ignore[attr-defined]
