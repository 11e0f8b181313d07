"""dcmtk `storescu` sends the whole dev corpus; every instance is archived and every archived object
rebuilds the received file byte for byte.

Each encapsulated (compressed) file goes in its own storescu call proposing its own syntax (`-R`
plus the matching `-x*`): storescu cannot decompress JPEG 2000, and for a batch it would propose
Explicit VR LE first.  The uncompressed files go in one call per syntax, so that each arrives as
it is stored (Implicit with `-xi`, Big Endian with `-xb`, Deflated with `-xd`).

Run time: the archive runs with ARCHIVE_COMPRESSION_EFFORT=fast (JPEG-LS and zstd level 3
instead of every candidate at zstd 19), about twenty times less CPU; the best-of itself is
covered by the worker tests, and the storage ratio of the default effort on this corpus is
measured by bench/ingest.py.  Everything else - receive, catalogue, split, verify, store - is
the production path.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.catalog.tables import Instance, Series
from service.dicomfile import read_file_meta
from service.record import parse_record
from tests.archive_support import CORPUS, start_serve
from worker.pipeline import rebuild_file

pytestmark = [
    pytest.mark.slow,
    # The corpus holds non-conformant UIDs and VRs on purpose
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:Expected implicit VR"),
    pytest.mark.skipif(not CORPUS.is_dir(), reason=f"dev corpus not present at {CORPUS}"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed (make test installs it)"),
]

# storescu's flag that proposes a transfer syntax first (each also proposes the uncompressed ones)
PROPOSE_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
}
# In the corpus: a SeriesInstanceUID with spaces, accepted and catalogued as sent.  storescu would
# send it without them (dcmtk strips spaces from UIDs on reading), so this file goes byte for byte
# over a pynetdicom association instead: the archive must take the UID as the PACS holds it.
SPACED_SERIES_UID = "REM SAMPLES 1"
SPACED_FILE = "dwv/gdcm-CT-MONO2-8-abdo.dcm"
IGNORED = re.compile(r"in file: (.+), ignoring file")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    sop_instance_uid: str
    syntax: str


def _corpus() -> list[CorpusFile]:
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-conformant UIDs and VRs in the corpus
        for path in sorted(p for p in CORPUS.rglob("*") if p.is_file()):
            with path.open("rb") as fh:
                if fh.read(132)[128:] != b"DICM":
                    continue  # README.md, MANIFEST.tsv
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            files.append(CorpusFile(path, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)))
    return files


def _batches(files: list[CorpusFile]) -> list[tuple[str, list[CorpusFile]]]:
    """(propose flag, files) per storescu call, in sending order: compressed one by one first."""
    encapsulated = [f for f in files if UID(f.syntax).is_encapsulated]
    batches = [(PROPOSE_FLAG[f.syntax], [f]) for f in encapsulated]
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        group = [f for f in files if f.syntax == syntax]
        if group:
            batches.append((PROPOSE_FLAG[syntax], group))
    assert sum(len(group) for _, group in batches) == len(files), "a transfer syntax without a storescu flag"
    return batches


def _storescu(port: int, flag: str, files: list[CorpusFile]) -> list[CorpusFile]:
    """One storescu call; returns the files storescu skipped (it reads the SOP class from the data
    set and cannot where that element is encoded with VR UN)."""
    completed = subprocess.run(
        ["storescu", "-R", "-nh", flag, "-aec", "LVPARCHIVE", "127.0.0.1", str(port)] + [str(f.path) for f in files],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TCP_NODELAY": "1"},  # dcmtk keeps Nagle's algorithm on otherwise
    )
    skipped_paths = set(IGNORED.findall(completed.stderr))
    skipped = [f for f in files if str(f.path) in skipped_paths]
    # A call whose every file was skipped has nothing to propose and fails; any other failure counts
    assert completed.returncode == 0 or len(skipped) == len(files), completed.stderr[-3000:]
    return skipped


def _with_complete_meta(f: CorpusFile, directory: Path) -> Path:
    """The file, or a copy with the same data set bytes behind a complete file meta group (pynetdicom
    takes the SOP class from there; the archive writes its own meta group anyway)."""
    data = f.path.read_bytes()
    ds = pydicom.dcmread(f.path, stop_before_pixels=True)
    if "MediaStorageSOPClassUID" in ds.file_meta and "MediaStorageSOPInstanceUID" in ds.file_meta:
        return f.path
    meta = io.BytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(
            sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=UID(f.syntax)
        ),
    )
    copy = directory / f.path.name
    copy.write_bytes(b"\x00" * 128 + b"DICM" + meta.getvalue() + data[read_file_meta(data).dataset_offset :])
    return copy


def _pynetdicom_send(port: int, files: list[CorpusFile], directory: Path) -> None:
    """Send files as they are (pynetdicom streams the data set from the file, byte for byte), each
    in its own syntax."""
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    paths = [_with_complete_meta(f, directory) for f in files]
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    try:
        for path in paths:
            assert assoc.send_c_store(path).Status == 0x0000, path
    finally:
        assoc.release()


def _pixel_bytes(data: bytes | Path) -> bytes:
    source = data if isinstance(data, Path) else io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bytes(pydicom.dcmread(source).get("PixelData", b""))


def test_storescu_sends_dev_corpus_and_every_object_rebuilds(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _corpus()
    archive = start_serve(tmp_path, sqlite_url, embedded_workers=2, compression_effort="fast")
    kept: dict[str, CorpusFile] = {}  # duplicate SOP Instance UIDs: keep-first keeps the first sent
    raw = [f for f in files if f.path == CORPUS / SPACED_FILE]
    skipped: list[CorpusFile] = []
    try:
        for flag, group in _batches([f for f in files if f not in raw]):
            skipped += _storescu(archive.dicom_port, flag, group)
            for f in group:
                if f not in skipped:
                    kept.setdefault(f.sop_instance_uid, f)
        # What storescu could not send goes over a pynetdicom association (a single file today)
        assert len(skipped) <= 2, [str(f.path) for f in skipped]
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        _pynetdicom_send(archive.dicom_port, raw + skipped, tmp_path)
        for f in raw + skipped:
            kept.setdefault(f.sop_instance_uid, f)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            states = httpx.get(f"{archive.http}/stats", timeout=30).json()["instances_by_state"]
            if not states.get("received") and not states.get("compressing"):
                break
            time.sleep(1)
        engine = create_engine(sqlite_url)
        with Session(engine) as session:
            pairs = session.execute(select(Instance, Series.series_instance_uid).join(Series)).all()
        engine.dispose()
    finally:
        archive.stop()

    rows = [row for row, _ in pairs]
    assert {r.state for r in rows} == {"archived"}
    assert {r.version for r in rows} == {1}
    assert {r.sop_instance_uid for r in rows} == set(kept)
    assert SPACED_SERIES_UID in {series_uid for _, series_uid in pairs}
    original = stored = 0
    for row, series_uid in pairs:
        source = kept[row.sop_instance_uid]
        # Every object arrived in its file's own transfer syntax...
        assert row.transfer_syntax_uid == source.syntax, source.path
        # ...and its footprint is what the catalog says, self-describing, rebuilding the received file
        path = archive.data_dir / "store" / (row.object_key or "")
        assert path.stat().st_size == row.stored_bytes, source.path
        record = parse_record(path.read_bytes())
        assert (record.original_sha256, record.original_bytes) == (row.original_sha256, row.original_bytes)
        rebuilt = rebuild_file(record)
        assert hashlib.sha256(rebuilt).hexdigest() == row.original_sha256, source.path
        # storescu re-encodes the data set (group lengths, padding, UIDs), never the pixel values
        assert _pixel_bytes(rebuilt) == _pixel_bytes(source.path), source.path
        # The catalog holds the UIDs the object carries, as received
        received = pydicom.dcmread(io.BytesIO(rebuilt), stop_before_pixels=True)
        assert series_uid == str(received.SeriesInstanceUID).strip(" \x00"), source.path
        original += row.original_bytes
        stored += row.stored_bytes or 0
    assert not any((archive.data_dir / "store" / "staging").glob("*"))
    ratio = original / stored
    print(f"dev corpus over storescu: {len(rows)} instances, {original} -> {stored} bytes, ratio {ratio:.3f}")
    assert ratio > 1.5
