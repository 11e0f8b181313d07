"""SQLAlchemy 2 tables.  Kept apart from the pydantic schemas in `schemas.py`.

Empty strings, not NULL, stand for absent identifying attributes (PatientID, Issuer): unique
constraints treat NULLs as distinct on PostgreSQL, which would let one patient appear twice.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class InstanceState(StrEnum):
    RECEIVED = "received"
    COMPRESSING = "compressing"
    ARCHIVED = "archived"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # an older version replaced under the overwrite policy
    CORRUPT = "corrupt"  # its stored bytes failed verification on retrieval (or a scrub)


class Base(DeclarativeBase):
    pass


UID = String(64)
SHA256_HEX = String(64)


class Patient(Base):
    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id", name="uq_patient_identity"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8), index=True)
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    # Backslash-separated, sorted, as DICOM encodes multi-valued CS
    modalities_in_study: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    """One received version of one SOP instance.  Normally version 1 only; under the overwrite
    policy a differing re-send becomes version n+1 and the old one is kept until it archives."""

    __tablename__ = "instance"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version", name="uq_instance_version"),
        Index("ix_instance_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    replaces_pk: Mapped[int | None] = mapped_column(ForeignKey("instance.id"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    samples_per_pixel: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    source: Mapped[str] = mapped_column(String(16))  # c-store | stow | import
    original_bytes: Mapped[int] = mapped_column(BigInteger)
    original_sha256: Mapped[str] = mapped_column(SHA256_HEX)
    # SHA-256 of the dataset without the file meta group: what duplicates are compared on
    dataset_sha256: Mapped[str] = mapped_column(SHA256_HEX)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED, index=True)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    staging_key: Mapped[str | None] = mapped_column(String(256))
    object_key: Mapped[str | None] = mapped_column(String(256))
    codec: Mapped[str | None] = mapped_column(String(32), index=True)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The smallest record a classical codec alone (JPEG-LS, JPEG XL, zstd) gave: what the learned
    # codec's own contribution is measured against
    classical_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The candidates the record was chosen among, LVPNet weights included ("jpegls,lvpnet:lvpnet-ctx@
    # baf3c76f67aeb2bf,zstd;zstd19"); `lvpnet-archive backfill` re-compresses rows whose set differs
    # from the current one.  NULL: not recorded (archived before 0004, or by rebuild-catalog)
    encoder_set: Mapped[str | None] = mapped_column(String(200))
    # Who sent it: the calling AE title (C-STORE) or the API key name (STOW)
    calling_ae: Mapped[str | None] = mapped_column(String(64), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    # Epoch seconds: compared with the clock on every database, without timezone round trips
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    series: Mapped[Series] = relationship()


class AttributeConflict(Base):
    """A later instance disagreed with what the catalog holds for its patient/study/series."""

    __tablename__ = "attribute_conflict"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[str] = mapped_column(String(16))  # patient | study | series
    entity_pk: Mapped[int] = mapped_column(Integer)
    keyword: Mapped[str] = mapped_column(String(64))
    catalog_value: Mapped[str | None] = mapped_column(Text)
    incoming_value: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CommitmentState(StrEnum):
    PENDING = "pending"  # waiting for its instances, or for a delivery to succeed
    REPORTED = "reported"  # the peer acknowledged the N-EVENT-REPORT
    UNDELIVERABLE = "undeliverable"  # association gone and no peer configured, or delivery kept failing


class CommitmentRequest(Base):
    """A Storage Commitment N-ACTION: answered by N-EVENT-REPORT once every item is archived (or
    has failed, or the commitment timeout has passed).  Leased like instances: the SCP process that
    took the request reports it (on the same association if still open); if that process dies,
    another takes the request over when the lease runs out and reports on a new association."""

    __tablename__ = "commitment_request"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(UID, index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=CommitmentState.PENDING, index=True)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Epoch seconds, as for instance leases
    deadline: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    event_type: Mapped[int | None] = mapped_column(Integer)  # 1 all committed, 2 some failed
    delivered_via: Mapped[str | None] = mapped_column(String(32))  # same-association | new-association
    last_error: Mapped[str | None] = mapped_column(Text)


class CommitmentItem(Base):
    __tablename__ = "commitment_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_pk: Mapped[int] = mapped_column(ForeignKey("commitment_request.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    # As reported: None committed, else the Failure Reason (0x0110, 0x0112, 0x0119)
    failure_reason: Mapped[int | None] = mapped_column(Integer)


class ImportedFile(Base):
    """`import DIR` progress: a file listed here is not read again when an import is resumed."""

    __tablename__ = "imported_file"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path_sha256: Mapped[str] = mapped_column(SHA256_HEX, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(32))
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A REST credential.  Only the SHA-256 of the key is stored (keys are 256-bit random, so a
    fast hash suffices); `prefix` (the first characters) lets an admin tell keys apart."""

    __tablename__ = "api_key"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reader | uploader | admin
    key_sha256: Mapped[str] = mapped_column(SHA256_HEX, unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdminPassword(Base):
    """The dashboard's admin password (scrypt), set at first start."""

    __tablename__ = "admin_password"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scrypt_hash: Mapped[str] = mapped_column(String(256))
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Who did what to which study, when, from where.  In the catalog, never in log lines."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))  # key name, session user, AE title, "system"
    actor_kind: Mapped[str] = mapped_column(String(16))  # api-key | session | dicom-ae | system
    action: Mapped[str] = mapped_column(String(16), index=True)  # store | query | retrieve | delete | admin
    interface: Mapped[str] = mapped_column(String(16))  # stow | c-store | qido | c-find | wado | c-move | ...
    remote: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | refused | failed
    detail: Mapped[str | None] = mapped_column(Text)  # never patient data


class Tombstone(Base):
    """A deleted study, series or instance stays visible as deleted."""

    __tablename__ = "tombstone"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[str] = mapped_column(String(16))  # study | series | instance
    uid: Mapped[str] = mapped_column(UID, index=True)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[int] = mapped_column(Integer, default=0)


class ScrubRun(Base):
    """One pass of `lvpnet-archive scrub`: what it checked and found."""

    __tablename__ = "scrub_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    mode: Mapped[str] = mapped_column(String(16))  # headers | sample | full
    checked: Mapped[int] = mapped_column(Integer, default=0)
    corrupt: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(Text)
