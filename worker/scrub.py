"""Scrub: re-read the stored objects of archived instances and find the ones that no longer give
their original back, before a retrieval does.

Every archived instance's object is read and checked without decoding pixels:

* content address: a record is stored under the SHA-256 of its own bytes (`objects/ab/cd/<sha>.lva`),
  so any flipped, lost or swapped byte shows here, whatever the codec;
* the record parses, its header names the catalogued original (SHA-256, size), its sections are
  the ones its kind has, and their sizes add up (zstd frame content sizes, the pixel array's bytes);
* pixel sections: an LVPNet stream's header CRC, descriptor (against the record's array
  description) and every chunk's CRC-32 (`lvpnet.spec.container`, no model needed); the frame
  tables of the classical codecs; a zstd frame's content size.

Then all of them (`full`), a random sample (`sample`) or none (`headers`) are rebuilt to the
original file, whose SHA-256 must equal the catalog's.  An instance that fails is marked
`corrupt` (only if it is still archived under the same object: a worker may have superseded it
meanwhile), counted in `archive_verification_failures_total{stage="scrub"}` and logged with its
catalog id only.  Store errors other than "not found" are not corruption: they are counted as
errors and the instance is left as it is.  Each run is one `scrub_run` row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zstandard
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.catalog.tables import Instance, InstanceState, ScrubRun
from service.logs import fields
from service.record import Record, RecordError, Section, parse_record
from service.storage.base import OBJECTS_PREFIX, ObjectNotFoundError, ObjectStore
from worker import weights

LOGGER = logging.getLogger(__name__)
CONTENT_ADDRESS = re.compile(r"^objects/([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{64})\.lva$")
PAGE = 500
MODES = ("headers", "sample", "full")
REPORTED_FINDINGS = 1000  # findings kept in the report (all are counted and marked)


class ScrubFailure(Exception):
    """A check failed: `check` names which (missing | address | record | structure | rebuild | sha256)."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check, self.reason = check, reason


@dataclass
class Finding:
    instance_id: int
    object_key: str | None
    check: str
    reason: str


@dataclass
class ScrubReport:
    run_id: int | None
    mode: str
    sample: float
    checked: int = 0  # instances whose object was read and structure-checked
    rebuilt: int = 0  # of which rebuilt to the original and SHA-256 compared
    corrupt: int = 0  # marked corrupt by this run
    missing: int = 0  # of the corrupt: object absent from the store
    changed: int = 0  # failed, but no longer archived under that object when marked (left alone)
    errors: int = 0  # store errors other than "not found" (transient; nothing marked)
    unreferenced_objects: int = 0  # objects/ keys no catalog row names (informational)
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 clean; 1 corruption found; 3 no corruption but some objects could not be read."""
        if self.corrupt:
            return 1
        return 3 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["exit_code"] = self.exit_code
        return out


# ------------------------------------------------------------------------------ checks


def check_address(key: str, data: bytes) -> None:
    """A content-addressed key must name the SHA-256 of the bytes stored under it."""
    match = CONTENT_ADDRESS.match(key)
    if match is None:
        return  # not a content address: nothing to compare
    digest = hashlib.sha256(data).hexdigest()
    if digest != match.group(3):
        raise ScrubFailure("address", "object bytes do not match their content address (SHA-256 of the record)")


def _zstd_content_size(data: bytes, what: str) -> int:
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise ScrubFailure("structure", f"{what}: not a zstd frame ({exc})") from exc
    size = params.content_size
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise ScrubFailure("structure", f"{what}: zstd frame without a content size")
    return int(size)


def _bytes_section_size(section: Section, limit: int) -> int:
    if section.codec == "identity":
        size = len(section.data)
    elif section.codec == "zstd":
        size = _zstd_content_size(section.data, f"{section.name} section")
    else:
        raise ScrubFailure("structure", f"{section.name} section has unknown codec {section.codec!r}")
    if size > limit:
        raise ScrubFailure("structure", f"{section.name} section larger than the original file")
    return size


def pixel_nbytes(spec: dict[str, Any]) -> int:
    try:
        dtype = np.dtype(str(spec["dtype"]))
        shape = [int(n) for n in spec["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ScrubFailure("structure", f"record's array description is malformed ({type(exc).__name__})") from exc
    if dtype.kind not in "ui" or dtype.itemsize not in (1, 2) or any(n < 1 for n in shape):
        raise ScrubFailure("structure", "record's array description is not a supported array")
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _check_lvpnet(data: bytes, spec: dict[str, Any]) -> None:
    from lvpnet.errors import LVPNetError
    from lvpnet.spec.container import check_chunk, parse_header

    try:
        header = parse_header(data, max_samples=1 << 62)
        for index in range(len(header.chunks)):
            check_chunk(data, header, index)
    except LVPNetError as exc:
        raise ScrubFailure("structure", f"lvpnet stream: {exc}") from exc
    descriptor = header.descriptor
    if descriptor.dtype.numpy_name != spec["dtype"] or list(descriptor.shape()) != list(spec["shape"]):
        raise ScrubFailure("structure", "lvpnet stream describes another array than the record")


def _check_frame_table(data: bytes, spec: dict[str, Any], codec: str) -> None:
    """The classical codecs' container: u32 count, then (u32 length, stream) per frame."""
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        offset = 4
        for _ in range(count):
            (length,) = struct.unpack_from("<I", data, offset)
            offset += 4 + length
    except struct.error as exc:
        raise ScrubFailure("structure", f"{codec} frame table truncated") from exc
    if offset != len(data):
        raise ScrubFailure("structure", f"{codec} frame table does not match the section length")
    if count != max(1, int(spec.get("frames") or 1)):
        raise ScrubFailure("structure", f"{codec} section holds {count} frames, the record describes {spec['frames']}")


def check_record(data: bytes, original_sha256: str, original_bytes: int) -> Record:
    """Everything that can be checked without decoding pixels.  Raises ScrubFailure."""
    try:
        record = parse_record(data)
    except (RecordError, KeyError, TypeError, ValueError) as exc:
        raise ScrubFailure("record", f"record does not parse ({exc})") from exc
    if record.original_sha256 != original_sha256 or record.original_bytes != original_bytes:
        raise ScrubFailure("record", "record header names another original than the catalog")
    names = [s.name for s in record.sections]
    if record.kind == "whole":
        if names != ["file"]:
            raise ScrubFailure("structure", f"whole record with sections {names}")
        if _bytes_section_size(record.sections[0], original_bytes) != original_bytes:
            raise ScrubFailure("structure", "file section size differs from the original's")
        return record
    if record.kind != "split":
        raise ScrubFailure("record", f"unknown record kind {record.kind!r}")
    if names != ["head", "pixels", "tail"]:
        raise ScrubFailure("structure", f"split record with sections {names}")
    spec = record.pixels
    nbytes = pixel_nbytes(spec)
    head = _bytes_section_size(record.section("head"), original_bytes)
    tail = _bytes_section_size(record.section("tail"), original_bytes)
    if head + nbytes + tail != original_bytes:
        raise ScrubFailure("structure", "head + pixel + tail sizes do not add up to the original's")
    if spec.get("offset") is not None and int(spec["offset"]) != head:
        raise ScrubFailure("structure", "head section size differs from the pixel data offset")
    pixels = record.section("pixels")
    if pixels.codec == "lvpnet":
        _check_lvpnet(pixels.data, spec)
    elif pixels.codec in ("jpegls", "jxl-e7"):
        _check_frame_table(pixels.data, spec, pixels.codec)
    elif pixels.codec == "zstd":
        if _zstd_content_size(pixels.data, "pixels section") != nbytes:
            raise ScrubFailure("structure", "zstd pixel section size differs from the array's")
    else:
        raise ScrubFailure("structure", f"unknown pixel codec {pixels.codec!r}")
    return record


def load_codec_runtime(record: Record) -> None:
    """Torch's thread count and the default model, once, when a record needs the learned codec."""
    if record.kind == "split" and record.section("pixels").codec == "lvpnet":
        from worker import runtime

        runtime.load()


def check_rebuild(record: Record, original_sha256: str, original_bytes: int) -> None:
    """Decode the record to the original file and compare it with the catalog.  Raises ScrubFailure."""
    from worker.pipeline import rebuild_file

    load_codec_runtime(record)

    try:
        rebuilt = rebuild_file(record)
    except MemoryError:
        raise
    except Exception as exc:  # codec errors have many types; every one is the record's fault here
        raise ScrubFailure("rebuild", f"{type(exc).__name__}: {exc}"[:500]) from exc
    if len(rebuilt) != original_bytes or hashlib.sha256(rebuilt).hexdigest() != original_sha256:
        raise ScrubFailure("sha256", "rebuilt file differs from the catalogued SHA-256")


def check_object(store: ObjectStore, key: str, original_sha256: str, original_bytes: int, *, rebuild: bool) -> None:
    """All checks of one archived object.  Raises ScrubFailure; store errors other than a missing
    object propagate (they are not the object's fault)."""
    try:
        data = store.get_bytes(key)
    except ObjectNotFoundError as exc:
        raise ScrubFailure("missing", "archived object missing from the store") from exc
    check_address(key, data)
    record = check_record(data, original_sha256, original_bytes)
    if rebuild:
        check_rebuild(record, original_sha256, original_bytes)


# ------------------------------------------------------------------------------ the run


def _mark_corrupt(session_factory: sessionmaker[Session], instance_id: int, key: str, reason: str) -> bool:
    """Archived -> corrupt, only if the row still is archived under `key`.  True if marked."""
    with session_factory() as session:
        result = session.execute(
            update(Instance)
            .where(Instance.id == instance_id, Instance.state == InstanceState.ARCHIVED, Instance.object_key == key)
            .values(state=InstanceState.CORRUPT, failure_reason=f"scrub: {reason}"[:1000], updated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return result.rowcount == 1  # type: ignore[attr-defined]


def _pages(session_factory: sessionmaker[Session]) -> Any:
    last = 0
    while True:
        with session_factory() as session:
            rows = session.execute(
                select(Instance.id, Instance.object_key, Instance.original_sha256, Instance.original_bytes)
                .where(Instance.state == InstanceState.ARCHIVED, Instance.id > last)
                .order_by(Instance.id)
                .limit(PAGE)
            ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


def _unreferenced(session_factory: sessionmaker[Session], store: ObjectStore) -> int:
    with session_factory() as session:
        referenced = set(session.scalars(select(Instance.object_key).where(Instance.object_key.is_not(None))))
    return sum(1 for key in store.iter_keys(OBJECTS_PREFIX) if key not in referenced)


def _update_run(session_factory: sessionmaker[Session], report: ScrubReport, *, finished: bool) -> None:
    if report.run_id is None:
        return
    with session_factory() as session:
        run = session.get(ScrubRun, report.run_id)
        if run is None:
            return
        run.checked, run.corrupt = report.checked, report.corrupt
        summary = {k: v for k, v in report.to_dict().items() if k not in ("findings", "error_samples", "run_id")}
        summary["corrupt_instances"] = [f.instance_id for f in report.findings[:100]]
        run.detail = json.dumps(summary, sort_keys=True)
        if finished:
            run.finished_at = datetime.now(UTC)
        session.commit()


def scrub(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    mode: str = "full",
    sample: float = 1.0,
    seed: int | None = None,
    progress: Callable[[int], Any] | None = None,
    count_unreferenced: bool = True,
) -> ScrubReport:
    """One scrub pass over the archived instances.  mode: headers | sample (rebuild a `sample`
    fraction) | full (rebuild all).  `progress(total)` may return a tqdm-like object."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if mode == "sample" and not 0.0 <= sample <= 1.0:
        raise ValueError("sample must be a fraction between 0 and 1")
    fraction = {"headers": 0.0, "sample": sample, "full": 1.0}[mode]
    if fraction > 0:
        weights.use_store(store)
    chooser = random.Random(seed)
    started = time.monotonic()
    with session_factory() as session:
        total = int(
            session.scalar(select(func.count()).select_from(Instance).where(Instance.state == InstanceState.ARCHIVED))
            or 0
        )
        run = ScrubRun(mode=mode)
        session.add(run)
        session.commit()
        report = ScrubReport(run.id, mode, fraction)
    bar = progress(total) if progress is not None else None
    LOGGER.info("scrub started", extra=fields(run=report.run_id, mode=mode, sample=fraction, instances=total))
    try:
        for instance_id, key, sha, size in _pages(session_factory):
            rebuild = fraction >= 1.0 or (fraction > 0 and chooser.random() < fraction)
            try:
                if key is None:
                    raise ScrubFailure("missing", "archived instance has no object key")
                check_object(store, key, sha, size, rebuild=rebuild)
            except ScrubFailure as failure:
                _record_failure(session_factory, report, instance_id, key, failure)
            except MemoryError:
                raise
            except Exception as exc:  # the store, not the object: try again another time
                report.errors += 1
                if len(report.error_samples) < 20:
                    report.error_samples.append(f"instance {instance_id}: {type(exc).__name__}")
                LOGGER.warning(
                    "scrub could not read an object", extra=fields(instance=instance_id, error=type(exc).__name__)
                )
            else:
                report.rebuilt += int(rebuild)
            report.checked += 1
            if bar is not None:
                bar.update(1)
            if report.checked % PAGE == 0:
                _update_run(session_factory, report, finished=False)
        if count_unreferenced:
            report.unreferenced_objects = _unreferenced(session_factory, store)
    finally:
        if bar is not None:
            bar.close()
        report.seconds = round(time.monotonic() - started, 3)
        _update_run(session_factory, report, finished=True)
    LOGGER.info(
        "scrub finished",
        extra=fields(
            run=report.run_id,
            mode=mode,
            checked=report.checked,
            rebuilt=report.rebuilt,
            corrupt=report.corrupt,
            missing=report.missing,
            errors=report.errors,
            unreferenced_objects=report.unreferenced_objects,
            seconds=report.seconds,
        ),
    )
    return report


def _record_failure(
    session_factory: sessionmaker[Session],
    report: ScrubReport,
    instance_id: int,
    key: str | None,
    failure: ScrubFailure,
) -> None:
    marked = key is not None and _mark_corrupt(session_factory, instance_id, key, str(failure))
    if key is None:  # nothing to compare against: mark it by id
        with session_factory() as session:
            marked = bool(
                session.execute(
                    update(Instance)
                    .where(Instance.id == instance_id, Instance.state == InstanceState.ARCHIVED)
                    .values(state=InstanceState.CORRUPT, failure_reason=f"scrub: {failure}"[:1000])
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
            )
            session.commit()
    if not marked:
        report.changed += 1  # superseded, deleted or re-marked meanwhile: not this run's finding
        return
    report.corrupt += 1
    report.missing += int(failure.check == "missing")
    if len(report.findings) < REPORTED_FINDINGS:
        report.findings.append(Finding(instance_id, key, failure.check, failure.reason))
    metrics.VERIFICATION_FAILURES.labels(stage="scrub").inc()
    # The catalog id and which check failed; never UIDs or other dataset values
    LOGGER.error(
        "scrub found a corrupt instance", extra=fields(instance=instance_id, object_key=key, check=failure.check)
    )
