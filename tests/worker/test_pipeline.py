"""Split / best-of / rebuild on layouts that exercise every path, and leases on a real catalog."""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from service.catalog import leases
from service.catalog.tables import Instance
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.record import parse_record
from service.storage.filesystem import FilesystemStore
from tests.archive_support import ct_dataset, part10_bytes
from worker.pipeline import WorkerContext, archive_instance, build_record, rebuild_file, split_file


def _roundtrip(data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    built = build_record(data, sha, candidates=("jpegls", "zstd"))
    assert rebuild_file(parse_record(built.data)) == data
    # Never larger than the best candidate that encoded (plus the record's own header)
    assert min(built.sizes.values()) <= len(built.data)
    return built.record.codec


def test_native_little_endian_is_split_and_image_coded() -> None:
    data = part10_bytes(ct_dataset(seed=1))
    assert split_file(data) is not None
    assert _roundtrip(data) in ("jpegls", "zstd")


def test_signed_big_endian_and_implicit_rebuild_exactly() -> None:
    ds = ct_dataset(seed=2)
    ds.PixelRepresentation = 1
    ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16).astype(np.int16) - 1500).astype("<i2").tobytes()
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian):
        variant = copy.deepcopy(ds)
        variant.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:
            variant.PixelData = np.frombuffer(ds.PixelData, "<i2").astype(">i2").tobytes()
        _roundtrip(part10_bytes(variant))


def test_rgb_planar_and_odd_length_with_pad_byte() -> None:
    ds = ct_dataset(rows=5, cols=7, seed=3)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 1
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = np.random.default_rng(3).integers(0, 256, 5 * 7 * 3, dtype=np.uint8).tobytes() + b"\x00"
    data = part10_bytes(ds)
    split = split_file(data)
    assert split is not None and split.tail.startswith(b"\x00")
    _roundtrip(data)


def test_one_bit_and_trailing_junk_go_to_generic_or_tail() -> None:
    ds = ct_dataset(rows=16, cols=16, seed=4)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = bytes(range(32))
    data = part10_bytes(ds)
    assert split_file(data) is None
    assert _roundtrip(data) in ("file-zstd", "as-received")

    padded = ct_dataset(seed=5)
    padded.PixelData = padded.PixelData + b"JUNK" * 8  # longer than the description: kept in the tail
    _roundtrip(part10_bytes(padded))


def _context(tmp_path: Path, owner: str, lease_seconds: float) -> tuple[WorkerContext, Ingestor]:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    migrate(url)
    settings = Settings(data_dir=tmp_path, database_url=url, lease_seconds=lease_seconds)
    factory = make_session_factory(make_engine(url))
    store = FilesystemStore(tmp_path / "store")
    return WorkerContext(settings, factory, store, owner), Ingestor(settings, factory, store, lambda _id: None)


def test_dead_workers_lease_expires_and_another_worker_archives(tmp_path: Path) -> None:
    dead, ingestor = _context(tmp_path, "dead-worker", lease_seconds=0.5)
    source = tmp_path / "in.dcm"
    source.write_bytes(part10_bytes(ct_dataset(seed=6)))
    result = ingestor.ingest_file(source, source="import")
    assert result.instance_id is not None
    with dead.session_factory() as session:
        assert leases.claim(session, result.instance_id, dead.owner, 0.5)  # ...and then it "dies"
    alive, _ = _context(tmp_path, "live-worker", lease_seconds=30)
    assert archive_instance(alive, result.instance_id) == "skipped"  # lease still held
    time.sleep(0.6)
    with alive.session_factory() as session:
        assert leases.expired(session) == [result.instance_id]
    assert archive_instance(alive, result.instance_id) == "archived"
    assert archive_instance(alive, result.instance_id) == "skipped"  # idempotent
    with alive.session_factory() as session:
        row = session.get(Instance, result.instance_id)
        assert row is not None and row.state == "archived" and row.staging_key is None
        data = alive.store.get_bytes(row.object_key or "")
    assert hashlib.sha256(rebuild_file(parse_record(data))).hexdigest() == row.original_sha256
    assert list(alive.store.iter_keys("staging/")) == []


def test_missing_staged_object_fails_with_reason(tmp_path: Path) -> None:
    ctx, ingestor = _context(tmp_path, "worker", lease_seconds=30)
    source = tmp_path / "in.dcm"
    source.write_bytes(part10_bytes(ct_dataset(seed=7)))
    result = ingestor.ingest_file(source, source="import")
    with ctx.session_factory() as session:
        row = session.get(Instance, result.instance_id)
        assert row is not None
        ctx.store.delete(row.staging_key or "")
    assert archive_instance(ctx, result.instance_id or 0) == "failed"
    with ctx.session_factory() as session:
        row = session.get(Instance, result.instance_id)
        assert row is not None and row.state == "failed" and row.failure_reason == "staged object missing"


def test_single_image_mode_under_effort_max() -> None:
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    from lvpnet.spec.container import parse_header
    from service.config import CompressionEffort
    from worker.pipeline import configured_adapt_steps, encoder_set

    # A public 1024 x 256 frame on which LVPNet's fine-tuning pays (tests/lvpnet/test_cli.py)
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm"))
    ds.decompress(generate_instance_uid=False)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    plain = build_record(data, sha, candidates=("lvpnet",))
    adapted = build_record(data, sha, candidates=("lvpnet",), adapt_steps=40)
    assert rebuild_file(parse_record(adapted.data)) == data
    pixels = {s.name: s for s in adapted.record.sections}["pixels"]
    assert parse_header(pixels.data).version == 3 and parse_header(pixels.data).adaptation
    assert adapted.sizes["lvpnet"] < plain.sizes["lvpnet"]

    settings = Settings(compression_effort=CompressionEffort.MAX, codec_adapt_steps=40)
    assert configured_adapt_steps(settings) == 40
    assert configured_adapt_steps(Settings()) == 0  # "best" is the default: no fine-tuning
    assert encoder_set(("lvpnet", "zstd"), 19, 40).split(",")[0].endswith("+adapt40")
    assert "+adapt" not in encoder_set(("lvpnet", "zstd"), 19)
