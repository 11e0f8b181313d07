"""The per-instance pipeline, as plain functions: split, best-of compress, decode + rebuild +
SHA-256 verify, content-addressed object, mark archived, delete the staged file last."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from lvpnet.imageio import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    NATIVE_TRANSFER_SYNTAXES,
    native_pixel_array,
    pixel_layout,
    write_native_pixel_bytes,
)
from lvpnet.spec.container import parse_header
from service import metrics
from service.catalog import leases
from service.catalog.tables import Instance, InstanceState
from service.config import CompressionEffort, Settings
from service.logs import fields
from service.record import (
    ZSTD_LEVEL,
    Record,
    RecordError,
    Section,
    decode_bytes_section,
    object_key,
    pack_record,
    parse_record,
    smallest_bytes_section,
)
from service.storage.base import ObjectNotFoundError, ObjectStore
from worker import weights
from worker.pixelcodecs import PIXEL_CODECS, PixelCodec

LOGGER = logging.getLogger(__name__)
DEFAULT_CANDIDATES = ("lvpnet", "jpegls", "jxl-e7", "zstd")
# compression effort -> (pixel candidates, zstd level for the byte sections and the zstd candidate)
EFFORT: dict[CompressionEffort, tuple[tuple[str, ...], int]] = {
    CompressionEffort.BEST: (DEFAULT_CANDIDATES, ZSTD_LEVEL),
    CompressionEffort.FAST: (("jpegls", "zstd"), 3),
    CompressionEffort.MAX: (DEFAULT_CANDIDATES, ZSTD_LEVEL),
}


def configured_candidates(settings: Settings) -> tuple[tuple[str, ...], int]:
    """The pixel codecs to try and the zstd level, from the effort and ARCHIVE_CODEC_CANDIDATES."""
    candidates, zstd_level = EFFORT[settings.compression_effort]
    if settings.codec_candidates:
        candidates = tuple(c.strip() for c in settings.codec_candidates.split(",") if c.strip())
    return candidates, zstd_level


def configured_adapt_steps(settings: Settings) -> int:
    """Fine-tuning steps of LVPNet's single-image mode: only under compression effort "max"."""
    return settings.codec_adapt_steps if settings.compression_effort == CompressionEffort.MAX else 0


def encoder_set(candidates: tuple[str, ...], zstd_level: int, adapt_steps: int = 0) -> str:
    """What a record was chosen among, stored with it: a newer model (other weights), a wider
    candidate list or single-image mode gives another string, which is what `backfill` looks for."""
    names = []
    for name in sorted(set(candidates)):
        if name == "lvpnet":
            from lvpnet.zoo import ZOO
            from worker.runtime import default_model

            bundle = ZOO.get(default_model())
            name = f"lvpnet:{bundle.name}@{bundle.sha256[:16]}" + (f"+adapt{adapt_steps}" if adapt_steps else "")
        names.append(name)
    return f"{','.join(names)};zstd{zstd_level}"


# ------------------------------------------------------------------------------ split / rebuild


@dataclass
class SplitFile:
    head: bytes  # everything before the pixel values
    pixels: np.ndarray  # the stored words
    tail: bytes  # pad byte, bytes past the expected length, trailing elements
    spec: dict[str, Any] = field(default_factory=dict)


def split_file(data: bytes) -> SplitFile | None:
    """Cut a Part 10 file into non-pixel bytes and the pixel words, or None when the pixel values
    are not native words the image codecs take (encapsulated, deflated, 1/32-bit, float, 4:2:2...)."""
    ds = pydicom.dcmread(io.BytesIO(data), defer_size=None)
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    # Deflate: pixel offsets are in the inflated stream, not the file
    if syntax not in NATIVE_TRANSFER_SYNTAXES or syntax == DEFLATED_EXPLICIT_VR_LE:
        return None
    if "PixelData" not in ds:
        return None
    array = native_pixel_array(ds)
    if array is None:
        return None
    layout = pixel_layout(ds)
    start = _pixel_value_offset(data, syntax)
    if start is None:
        return None
    end = start + int(layout["expected_nbytes"])
    spec = {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "frames": layout["frames"],
        "samples": layout["samples"],
        "photometric": layout["photometric"],
        "bits_stored": layout["bits_stored"],
        "planar_configuration": layout["planar_configuration"],
        "big_endian": layout["big_endian"],
        "swap_8bit_words": layout["swap_8bit_words"],
        "offset": start,
    }
    if _native_bytes(array, spec) != data[start:end]:
        return None  # should not happen; if it does, the whole file goes to generic compression
    return SplitFile(data[:start], array, data[end:], spec)


def _pixel_value_offset(data: bytes, syntax: str) -> int | None:
    """File offset of the top-level PixelData value: walk the raw elements after the meta group."""
    from pydicom.filereader import data_element_generator

    from service.dicomfile import read_file_meta

    fp = io.BytesIO(data)
    fp.seek(read_file_meta(data[: 64 * 1024]).dataset_offset)
    implicit, little = syntax == IMPLICIT_VR_LE, syntax != EXPLICIT_VR_BE
    for element in data_element_generator(fp, implicit, little, defer_size=1):
        if element.tag == 0x7FE00010:
            return int(element.value_tell)  # type: ignore[union-attr]
    return None


def _native_bytes(array: np.ndarray, spec: dict[str, Any]) -> bytes:
    return write_native_pixel_bytes(
        array,
        planar_configuration=spec["planar_configuration"],
        big_endian=spec["big_endian"],
        swap_8bit_words=spec["swap_8bit_words"],
    )


def decode_pixels(section: Section, spec: dict[str, Any]) -> np.ndarray:
    codec = PIXEL_CODECS.get(section.codec)
    if codec is None:
        raise RecordError(f"unknown pixel codec {section.codec!r}")
    array = np.asarray(codec.decode(section.data, spec))
    if array.dtype.name != spec["dtype"] or list(array.shape) != spec["shape"]:
        raise RecordError(
            f"{section.codec} decoded {array.dtype}{array.shape}, expected {spec['dtype']}{spec['shape']}"
        )
    return array


def rebuild_file(record: Record) -> bytes:
    """The original file, byte for byte (the caller checks the SHA-256)."""
    limit = record.original_bytes
    if record.kind == "whole":
        return decode_bytes_section(record.section("file"), limit)
    if record.kind != "split":
        raise RecordError(f"unknown record kind {record.kind!r}")
    head = decode_bytes_section(record.section("head"), limit)
    tail = decode_bytes_section(record.section("tail"), limit)
    pixels = _native_bytes(decode_pixels(record.section("pixels"), record.pixels), record.pixels)
    return head + pixels + tail


# ------------------------------------------------------------------------------ best-of


@dataclass
class BuiltRecord:
    data: bytes
    record: Record
    sizes: dict[str, int]  # candidate -> section bytes (those that encoded)
    # The smallest record without the learned codec (what JPEG-LS / JPEG XL / zstd alone would
    # store): the dashboard shows the learned codec's own contribution against it
    classical_bytes: int | None = None


def _verified(record: Record, original_sha256: str) -> bytes | None:
    packed = pack_record(record)
    try:
        rebuilt = rebuild_file(parse_record(packed))  # through the real parse path
    except Exception:
        LOGGER.exception("rebuild failed", extra=fields(codec=record.codec))
        return None
    if hashlib.sha256(rebuilt).hexdigest() != original_sha256:
        metrics.VERIFICATION_FAILURES.labels(stage="archive").inc()
        LOGGER.error("rebuilt file differs from the original", extra=fields(codec=record.codec))
        return None
    return packed


def build_record(
    data: bytes,
    original_sha256: str,
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
    zstd_level: int = ZSTD_LEVEL,
    adapt_steps: int = 0,
) -> BuiltRecord:
    """Compress every way allowed, keep the smallest record that decodes back to the original.
    `adapt_steps` > 0: LVPNet in single-image mode (fine-tuned on this instance)."""
    sizes: dict[str, int] = {}
    split = None
    try:
        split = split_file(data)
    except Exception:
        LOGGER.warning("cannot split; compressing the whole file", exc_info=True)
    options: list[Record] = []
    if split is not None:
        head = smallest_bytes_section("head", split.head, zstd_level)
        tail = smallest_bytes_section("tail", split.tail, zstd_level)
        # The level rides in a copy of the spec: it is an encoder choice, not part of the record
        encode_spec = {**split.spec, "zstd_level": zstd_level, "adapt_steps": adapt_steps}
        for name in candidates:
            if name not in PIXEL_CODECS:
                LOGGER.error("unknown codec candidate ignored", extra=fields(codec=name))
                continue
            codec: PixelCodec = PIXEL_CODECS[name]
            try:
                stream = codec.encode(split.pixels, encode_spec)
            except Exception as exc:  # a codec that does not take this layout is simply not a candidate
                LOGGER.info("candidate skipped", extra=fields(codec=name, error=type(exc).__name__))
                continue
            sizes[name] = len(stream)
            sections = [head, Section("pixels", name, stream), tail]
            options.append(Record("split", original_sha256, len(data), sections, split.spec))
    whole = Record("whole", original_sha256, len(data), [smallest_bytes_section("file", data, zstd_level)])
    sizes[whole.codec] = len(whole.sections[0].data)
    options.append(whole)
    options.sort(key=lambda r: sum(len(s.data) for s in r.sections))
    classical = [r for r in options if r.codec != "lvpnet"]
    classical_bytes = len(pack_record(classical[0])) if classical else None
    for record in options:
        packed = _verified(record, original_sha256)
        if packed is not None:
            return BuiltRecord(packed, record, sizes, classical_bytes)
    raise RecordError("no candidate rebuilt the original file")


# ------------------------------------------------------------------------------ the task body


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    store: ObjectStore
    owner: str


class LeaseLost(Exception):
    """Another worker took the instance over (our lease expired): drop the work, change nothing."""


class _LeaseKeeper:
    """Renews the lease every third of its length while the instance is being worked on."""

    def __init__(self, ctx: WorkerContext, instance_id: int) -> None:
        self.ctx, self.instance_id = ctx, instance_id
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{instance_id}", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self.ctx.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                with self.ctx.session_factory() as session:
                    if not leases.renew(session, self.instance_id, self.ctx.owner, self.ctx.settings.lease_seconds):
                        self.lost = True
                        return
            except Exception:
                LOGGER.warning("lease renewal failed", extra=fields(instance=self.instance_id), exc_info=True)


def _fail(ctx: WorkerContext, instance_id: int, reason: str) -> None:
    with ctx.session_factory() as session:
        instance = session.get(Instance, instance_id)
        if instance is not None and instance.lease_owner == ctx.owner:
            instance.state = InstanceState.FAILED
            instance.failure_reason = reason
            instance.lease_owner = None
            instance.lease_expires_at = None
            session.commit()
            metrics.ARCHIVE_FAILURES.inc()
    LOGGER.error("instance failed", extra=fields(instance=instance_id, reason=reason))


def archive_instance(ctx: WorkerContext, instance_id: int) -> str:
    """Idempotent: an instance that is archived, failed, or held by a live lease is left alone.
    Returns what happened: archived | skipped | failed.  Transient errors (store, database)
    propagate after the lease is released, for the caller to retry."""
    with ctx.session_factory() as session:
        if not leases.claim(session, instance_id, ctx.owner, ctx.settings.lease_seconds):
            return "skipped"
        instance = session.get(Instance, instance_id)
        assert instance is not None
        staging_key, original_sha256 = instance.staging_key, instance.original_sha256
        replaces_pk = instance.replaces_pk
    started = time.monotonic()
    try:
        with _LeaseKeeper(ctx, instance_id) as keeper:
            try:
                if staging_key is None:
                    raise ObjectNotFoundError("no staging key")
                data = ctx.store.get_bytes(staging_key)
            except ObjectNotFoundError:
                _fail(ctx, instance_id, "staged object missing")
                return "failed"
            if hashlib.sha256(data).hexdigest() != original_sha256:
                _fail(ctx, instance_id, "staged object does not match the received SHA-256")
                return "failed"
            candidates, zstd_level = configured_candidates(ctx.settings)
            adapt_steps = configured_adapt_steps(ctx.settings)
            try:
                built = build_record(data, original_sha256, candidates, zstd_level, adapt_steps)
            except RecordError as exc:
                _fail(ctx, instance_id, str(exc))
                return "failed"
            if keeper.lost:
                raise LeaseLost()
            key = put_record(ctx.store, built)
            _mark_archived(ctx, instance_id, key, built, replaces_pk, encoder_set(candidates, zstd_level, adapt_steps))
    except LeaseLost:
        LOGGER.warning("lease lost; another worker has the instance", extra=fields(instance=instance_id))
        return "skipped"
    except Exception:
        with ctx.session_factory() as session:
            leases.release(session, instance_id, ctx.owner)
        raise
    # Last: only now may the staged original go.  A crash before this leaves an orphan staged
    # file for an archived instance, never an archived instance without its bytes.
    ctx.store.delete(staging_key)
    with ctx.session_factory() as session:
        instance = session.get(Instance, instance_id)
        if instance is not None and instance.state == InstanceState.ARCHIVED:
            instance.staging_key = None
            session.commit()
    seconds = time.monotonic() - started
    metrics.COMPRESSION_SECONDS.labels(codec=built.record.codec).observe(seconds)
    metrics.ARCHIVED.labels(codec=built.record.codec).inc()
    metrics.ARCHIVED_BYTES.labels(codec=built.record.codec, kind="original").inc(len(data))
    metrics.ARCHIVED_BYTES.labels(codec=built.record.codec, kind="stored").inc(len(built.data))
    LOGGER.info(
        "instance archived",
        extra=fields(
            instance=instance_id,
            codec=built.record.codec,
            original_bytes=len(data),
            stored_bytes=len(built.data),
            candidates=built.sizes,
            seconds=round(time.monotonic() - started, 3),
        ),
    )
    return "archived"


def put_record(store: ObjectStore, built: BuiltRecord) -> str:
    """Store a record under its content address and read it back; returns the key.  An LVPNet
    record goes in only once the weights its stream names are in the store too."""
    for section in built.record.sections:
        if section.codec == "lvpnet":
            header = parse_header(section.data)
            weights.ensure_stored(store, header.codec_id, header.weights_sha256.hex())
    record_sha = hashlib.sha256(built.data).hexdigest()
    key = object_key(record_sha)
    store.put_bytes(key, built.data)
    # Read back what the store now holds: a completed PUT of other bytes is not archived
    if hashlib.sha256(store.get_bytes(key)).hexdigest() != record_sha:
        raise OSError("object store returned different bytes than were written")
    return key


def _mark_archived(
    ctx: WorkerContext, instance_id: int, key: str, built: BuiltRecord, replaces_pk: int | None, chosen_among: str
) -> None:
    with ctx.session_factory() as session:
        instance = session.get(Instance, instance_id, with_for_update=True)
        if instance is None or instance.lease_owner != ctx.owner or instance.state != InstanceState.COMPRESSING:
            raise LeaseLost()
        instance.state = InstanceState.ARCHIVED
        instance.object_key = key
        instance.codec = built.record.codec
        instance.stored_bytes = len(built.data)
        instance.classical_bytes = built.classical_bytes
        instance.encoder_set = chosen_among
        instance.archived_at = datetime.now(UTC)
        instance.lease_owner = None
        instance.lease_expires_at = None
        old_key = old_staged = None
        if replaces_pk is not None:
            old = session.get(Instance, replaces_pk)
            if old is not None and old.state != InstanceState.SUPERSEDED:
                old.state = InstanceState.SUPERSEDED
                old_key = old.object_key if old.object_key != key else None
                old_staged, old.staging_key = old.staging_key, None
        session.commit()
        if old_staged is not None:
            ctx.store.delete(old_staged)
        if old_key is not None:
            still_used = session.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.object_key == old_key, Instance.state == InstanceState.ARCHIVED)
            )
            if not still_used:
                ctx.store.delete(old_key)
