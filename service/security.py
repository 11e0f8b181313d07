"""Credentials: API keys (SHA-256 stored), the admin password (scrypt), signed session cookies,
and the DICOM calling-AE allow-lists."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.catalog.tables import AdminPassword, ApiKey

KEY_PREFIX = "lvpa_"
SESSION_COOKIE = "lvp_session"
SESSION_SECONDS = 8 * 3600
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


class Role(StrEnum):
    READER = "reader"  # QIDO-RS, WADO-RS
    UPLOADER = "uploader"  # STOW-RS
    ADMIN = "admin"  # everything: dashboard, stats, keys, deletion


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    kind: str  # api-key | session | anonymous (authentication switched off on loopback)

    def may(self, *roles: Role) -> bool:
        return self.role == Role.ADMIN or self.role in roles


# ------------------------------------------------------------------------------ API keys


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, role: Role) -> str:
    """Store a new key's digest; return the key (shown once, never stored)."""
    if not name or len(name) > 64:
        raise ValueError("key name must be 1 to 64 characters")
    if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
        raise ValueError(f"a key named {name!r} exists")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, role=str(role), key_sha256=key_digest(key), prefix=key[:12]))
    session.commit()
    return key


def authenticate_key(session: Session, key: str) -> Principal | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == key_digest(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    now = datetime.now(UTC)
    # last-used is informational; writing it at most once a minute keeps reads from becoming writes
    last = row.last_used_at.replace(tzinfo=UTC) if row.last_used_at and row.last_used_at.tzinfo is None else None
    if row.last_used_at is None or (now - (last or row.last_used_at)).total_seconds() > 60:
        row.last_used_at = now
        session.commit()
    return Principal(row.name, Role(row.role), "api-key")


def revoke_key(session: Session, name: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if row is None:
        return False
    row.revoked_at = datetime.now(UTC)
    session.commit()
    return True


# ------------------------------------------------------------------------------ admin password


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)  # type: ignore[arg-type]
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, salt, digest = stored.split("$")
        candidate = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **SCRYPT)  # type: ignore[arg-type]
    except ValueError:
        return False
    return hmac.compare_digest(candidate.hex(), digest)


def ensure_admin_password(session: Session, configured: str, data_dir: Path) -> Path | None:
    """At first start: store the configured password, or generate one and write it to a file only
    the archive's user can read.  Returns that file's path when one was generated."""
    if session.scalar(select(AdminPassword).limit(1)) is not None:
        return None
    generated = None
    password = configured
    if not password:
        password = secrets.token_urlsafe(18)
        generated = data_dir / "initial-admin-password"
        generated.parent.mkdir(parents=True, exist_ok=True)
        generated.touch(mode=0o600)
        generated.write_text(password + "\n")
    session.add(AdminPassword(scrypt_hash=hash_password(password)))
    session.commit()
    return generated


def authenticate_password(session: Session, password: str) -> Principal | None:
    row = session.scalar(select(AdminPassword).order_by(AdminPassword.id.desc()).limit(1))
    if row is not None and check_password(password, row.scrypt_hash):
        return Principal("admin", Role.ADMIN, "session")
    return None


# ------------------------------------------------------------------------------ sessions


def session_secret(configured: str, data_dir: Path) -> bytes:
    """ARCHIVE_SESSION_SECRET (processes on several hosts must share it), else one kept in data_dir."""
    if configured:
        return configured.encode()
    path = data_dir / "session-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip().encode()


def sign_session(principal: Principal, secret: bytes, now: float | None = None) -> str:
    payload = {"name": principal.name, "role": str(principal.role), "exp": int((now or time.time()) + SESSION_SECONDS)}
    body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()
    mac = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def verify_session(token: str, secret: bytes, now: float | None = None) -> Principal | None:
    body, _, mac = token.partition(".")
    expected = hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()
    if not mac or not hmac.compare_digest(mac, expected):
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(body.encode()))
        if payload["exp"] < (now or time.time()):
            return None
        return Principal(str(payload["name"]), Role(payload["role"]), "session")
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------ DICOM allow-lists


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AllowList:
    """`AE` or `AE@host` entries, or `*` for anyone."""

    entries: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> AllowList:
        return cls(tuple(e.strip() for e in text.split(",") if e.strip()))

    @property
    def anyone(self) -> bool:
        return "*" in self.entries

    def allows(self, ae_title: str, host: str) -> bool:
        title = ae_title.strip()
        return self.anyone or title in self.entries or f"{title}@{host}" in self.entries
