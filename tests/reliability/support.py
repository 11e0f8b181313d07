"""Archived instances built in-process (ingest + the worker's pipeline), and record surgery."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy.orm import Session, sessionmaker

from service.catalog.tables import Instance
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.record import parse_record
from service.storage.filesystem import FilesystemStore
from tests.archive_support import ct_dataset, part10_bytes
from worker.pipeline import WorkerContext, archive_instance


def with_tail(ds: Dataset, seed: int) -> Dataset:
    """Elements after the pixel data (a split record's tail section is then not empty)."""
    ds.DataSetTrailingPadding = np.random.default_rng(seed).integers(0, 4, 96, dtype=np.uint8).tobytes()
    return ds


def pydicom_file_bytes(name: str, study_uid: str | None = None) -> bytes:
    """A pydicom test file with fresh instance UIDs (so several tests may archive it)."""
    path = get_testdata_file(name)
    assert path is not None, name
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def rgb_dataset(rows: int = 24, cols: int = 20, seed: int = 0) -> Dataset:
    """8-bit RGB, smooth plus noise (pydicom's RGB test files are flat bars that zstd takes whole)."""
    ds = ct_dataset(rows, cols, seed=seed)
    y, x = np.mgrid[0:rows, 0:cols]
    noise = np.random.default_rng(seed).integers(0, 8, (rows, cols, 3))
    pixels = (np.stack([x * 5, y * 7, (x + y) * 3], axis=-1) + noise).clip(0, 255).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.Modality = "XC"
    ds.PixelData = pixels.tobytes()
    return ds


def sample_files() -> dict[str, bytes]:
    """Small files covering the record shapes: mono 12-bit with a tail, multi-frame, RGB, and a
    JPEG original kept whole."""
    return {
        "ct-tail": part10_bytes(with_tail(ct_dataset(48, 40, seed=11), seed=11)),
        "multiframe": pydicom_file_bytes("emri_small.dcm"),
        "rgb": part10_bytes(rgb_dataset(seed=12)),
        "jpeg": pydicom_file_bytes("SC_rgb_jpeg_dcmtk.dcm"),
    }


@dataclass
class Archive:
    root: Path
    url: str
    settings: Settings
    session_factory: sessionmaker[Session]
    store: FilesystemStore
    ctx: WorkerContext
    ingestor: Ingestor

    def ingest(self, name: str, data: bytes) -> int:
        path = self.root / f"{name}.dcm"
        path.write_bytes(data)
        result = self.ingestor.ingest_file(path, source="import")
        assert result.instance_id is not None, result
        return result.instance_id

    def archive(self, instance_id: int, candidates: str | None = None) -> Instance:
        ctx = self.ctx
        if candidates is not None:
            settings = self.settings.model_copy(update={"codec_candidates": candidates})
            ctx = WorkerContext(settings, self.session_factory, self.store, "test-worker")
        assert archive_instance(ctx, instance_id) == "archived"
        return self.row(instance_id)

    def row(self, instance_id: int) -> Instance:
        with self.session_factory() as session:
            row = session.get(Instance, instance_id)
            assert row is not None
            return row

    def set_state(self, instance_id: int, state: str) -> None:
        with self.session_factory() as session:
            row = session.get(Instance, instance_id)
            assert row is not None
            row.state, row.failure_reason = state, None
            session.commit()

    def close(self) -> None:
        engine = self.session_factory.kw["bind"]
        engine.dispose()


def open_archive(root: Path, url: str, candidates: str = "lvpnet,zstd") -> Archive:
    root.mkdir(parents=True, exist_ok=True)
    migrate(url)
    settings = Settings(data_dir=root, database_url=url, codec_candidates=candidates, lease_seconds=60)
    factory = make_session_factory(make_engine(url))
    store = FilesystemStore(root / "store")
    ctx = WorkerContext(settings, factory, store, "test-worker")
    return Archive(root, url, settings, factory, store, ctx, Ingestor(settings, factory, store, lambda _id: None))


def section_spans(record_bytes: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a record's header and sections within the record."""
    record = parse_record(record_bytes)
    header_length = int.from_bytes(record_bytes[8:12], "little")
    spans = {"header": (12, 12 + header_length)}
    offset = 12 + header_length
    for section in record.sections:
        spans[section.name] = (offset, offset + len(section.data))
        offset += len(section.data)
    return spans


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    damaged = bytearray(data)
    damaged[position] ^= 1 << bit
    return bytes(damaged)
