"""Shared test helpers: real servers in subprocesses, real databases, synthetic DICOM files."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
CORPUS = Path("/work/shared/corpus/dev")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh catalog database: SQLite in tmp_path, or a new PostgreSQL database per test."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
        return
    name = f"archive_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432 ({exc})")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ct_dataset(
    rows: int = 64,
    cols: int = 64,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "TEST-PATIENT",
    description: str = "synthetic",
) -> Dataset:
    """A small 12-bit CT image in Explicit VR Little Endian with smooth content plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    pixels = (1000 + 400 * np.sin(x / 7.0) * np.cos(y / 5.0) + rng.integers(0, 16, (rows, cols))).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def part10_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def received_size(ds: Dataset) -> int:
    """The size of the Part 10 file pynetdicom's chunked receive writes for `ds` sent in Explicit VR
    LE: preamble, DICM, pynetdicom's own file meta group, the data set as encoded on the wire."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta, encode

    meta = io.BytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(
            sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=ExplicitVRLittleEndian
        ),
    )
    encoded = encode(ds, False, True)
    assert encoded is not None
    return 132 + len(meta.getvalue()) + len(encoded)


def dataset_part(data: bytes) -> bytes:
    from service.dicomfile import read_file_meta

    return data[read_file_meta(data).dataset_offset :]


@dataclass
class ArchiveProcess:
    """`lvpnet-archive serve` (or another command) running as a real process."""

    data_dir: Path
    database_url: str
    http_port: int
    dicom_port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    scheme: str = "http"
    headers: dict[str, str] = field(default_factory=dict)  # credentials, where authentication is on
    log_path: Path = field(default=Path("/dev/null"))

    @property
    def http(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def instance(self, uid: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.http}/instances/{uid}", timeout=30, headers=self.headers, verify=False)
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def wait_state(
        self, uid: str, states: set[str], *, limit_seconds: float = 300, version: int | None = None
    ) -> dict[str, Any]:
        """Poll until the instance (newest version, or `version`) reaches one of `states`."""
        deadline = time.monotonic() + limit_seconds
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            versions = self.instance(uid)
            chosen = [v for v in versions if version is None or v["version"] == version]
            if chosen:
                last = chosen[0]
                if last["state"] in states:
                    return last
            time.sleep(0.2)
        raise AssertionError(f"instance never reached {states}; last seen {last}\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_serve(tmp_path: Path, database_url: str, scheme: str = "http", **settings: Any) -> ArchiveProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data_dir = tmp_path / "var"
    archive = ArchiveProcess(data_dir, database_url, free_port(), free_port(), {}, scheme=scheme)
    env = {
        **os.environ,
        "ARCHIVE_DATA_DIR": str(data_dir),
        "ARCHIVE_DATABASE_URL": database_url,
        "ARCHIVE_HTTP_PORT": str(archive.http_port),
        "ARCHIVE_DICOM_PORT": str(archive.dicom_port),
        "ARCHIVE_LEASE_SECONDS": "20",
        "ARCHIVE_SWEEP_INTERVAL_SECONDS": "2",
        "TCP_NODELAY": "1",
        # Authentication has its own tests (tests/service/test_security.py); elsewhere it is off,
        # which the archive allows only on loopback
        "ARCHIVE_REQUIRE_AUTH": "false",
    }
    env.update({f"ARCHIVE_{k.upper()}": str(v) for k, v in settings.items()})
    archive.env = env
    archive.log_path = tmp_path / "serve.log"
    with archive.log_path.open("wb") as log:
        archive.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if archive.process.poll() is not None:
            raise AssertionError(f"serve exited: {archive.log()[-4000:]}")
        try:
            # verify=False: only "is it up"; the HTTPS test checks the certificate itself
            up = httpx.get(f"{archive.http}/healthz", timeout=2, verify=False).status_code == 200
            if up and _port_open(archive.dicom_port):
                return archive
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    archive.stop()
    raise AssertionError(f"serve did not come up: {archive.log()[-4000:]}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def c_store(port: int, datasets: list[Dataset], ae_title: str = "LVPARCHIVE", calling_ae: str = "TESTSCU") -> list[int]:
    """Send over one real association with pynetdicom; returns the status of each C-STORE."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    # Explicit VR LE first, as dcmtk's storescu proposes: the archive keeps what is offered first
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets if "SOPClassUID" in ds}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, "association rejected"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def stow(
    http: str, parts: list[bytes], study: str | None = None, boundary: str = "archive-test-boundary"
) -> httpx.Response:
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n"
            for part in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    url = f"{http}/dicomweb/studies" + (f"/{study}" if study else "")
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    return httpx.post(url, content=body, headers=headers, timeout=120)


def rebuild_from_store(data_dir: Path, object_key: str) -> bytes:
    from service.record import parse_record
    from worker.pipeline import rebuild_file

    return rebuild_file(parse_record((data_dir / "store" / object_key).read_bytes()))


def parse_multipart(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response: (headers with lower-case names, body)."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = next(
        p.split("=", 1)[1].strip('"') for p in (s.strip() for s in content_type.split(";")) if p.startswith("boundary=")
    )
    body = response.content
    delimiter = b"--" + boundary.encode()
    assert body.rstrip(b"\r\n").endswith(delimiter + b"--"), "multipart body has no closing delimiter"
    parts = []
    for chunk in body.split(delimiter)[1:-1]:
        chunk = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("ascii").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


MIXED_SYNTAX_FILES = ("MR_small_bigendian.dcm", "JPEG-LL.dcm", "US1_J2KR.dcm")


def mixed_syntax_study(study_uid: str) -> list[bytes]:
    """pydicom's Explicit VR Big Endian, JPEG lossless and JPEG 2000 lossless test files, moved
    into one study (written back in their own transfer syntax)."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    files = []
    for name in MIXED_SYNTAX_FILES:
        ds = dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study_uid
        buffer = io.BytesIO()
        ds.save_as(buffer)
        files.append(buffer.getvalue())
    return files


@contextlib.contextmanager
def moto_s3(log_path: Path | None = None) -> Iterator[str]:
    """moto's standalone S3 server as a process on loopback; yields its endpoint URL."""
    port = free_port()
    log = log_path.open("wb") if log_path is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_path is not None:
            log.close()  # type: ignore[union-attr]
