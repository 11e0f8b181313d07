"""Pydantic schemas for what the API and `stats` show (kept apart from the tables)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class Breakdown(BaseModel):
    instances: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0


class Stats(BaseModel):
    instances_by_state: dict[str, int]
    instances: int
    original_bytes: int  # every instance held (superseded versions excluded)
    archived_original_bytes: int
    stored_bytes: int  # archived instances' records
    storage_ratio: float | None  # archived original bytes / stored bytes
    by_modality: dict[str, Breakdown]
    by_codec: dict[str, Breakdown]


class InstanceStatus(BaseModel):
    """No patient data: state and sizes only."""

    id: int
    version: int
    state: str
    failure_reason: str | None
    transfer_syntax_uid: str
    original_bytes: int
    original_sha256: str
    codec: str | None
    stored_bytes: int | None
    object_key: str | None
    received_at: datetime
    archived_at: datetime | None
