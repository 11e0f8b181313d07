"""WADO-RS through real HTTP against a real `serve`: originals byte for byte with their SHA-256,
transfer syntax negotiation with pixel-level checks, metadata, frames, bulk data, errors, and
corruption detected before a byte is sent."""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from tests.archive_support import (
    ArchiveProcess,
    c_store,
    ct_dataset,
    database,
    dataset_part,
    mixed_syntax_study,
    parse_multipart,
    part10_bytes,
    rebuild_from_store,
    start_serve,
    stow,
)

MULTIPART_ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MIXED_STUDY = "1.2.826.0.1.3680043.8.498.1"
MIXED = mixed_syntax_study(MIXED_STUDY)


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(pydicom.dcmread(io.BytesIO(data)).pixel_array)


class Archive:
    def __init__(self, process: ArchiveProcess) -> None:
        self.process = process
        self.http = process.http
        self.originals: dict[str, bytes] = {}  # SOP Instance UID -> the file as the archive holds it
        self.ct_study = ""
        self.ct_series: list[str] = []

    def url(self, study: str, series: str | None = None, sop: str | None = None, tail: str = "") -> str:
        url = f"{self.http}/dicomweb/studies/{study}"
        if series:
            url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
        return url + tail

    def sha(self, uid: str) -> str:
        return str(self.process.instance(uid)[0]["original_sha256"])


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    tmp = tmp_path_factory.mktemp("wado")
    with database("sqlite", tmp) as url:
        process = start_serve(tmp, url)
        try:
            archive = Archive(process)
            study = ct_dataset(seed=10).StudyInstanceUID
            series = [ct_dataset(seed=11).SeriesInstanceUID, ct_dataset(seed=12).SeriesInstanceUID]
            cts = [
                ct_dataset(rows=96, cols=80, seed=20 + i, study_uid=study, series_uid=series[i % 2]) for i in range(3)
            ]
            assert c_store(process.dicom_port, cts) == [0, 0, 0]
            files = [*MIXED, pydicom_file("emri_small.dcm"), pydicom_file("SC_rgb.dcm")]
            assert stow(process.http, files).status_code == 200
            archive.ct_study, archive.ct_series = study, series
            for ds in cts:
                row = process.wait_state(ds.SOPInstanceUID, {"archived"})
                archive.originals[ds.SOPInstanceUID] = rebuild_from_store(process.data_dir, row["object_key"])
            for data in files:
                uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
                process.wait_state(uid, {"archived"})
                archive.originals[uid] = data
            yield archive
        finally:
            process.stop()


def _ids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def test_instance_original_bytes_with_sha256(archive: Archive) -> None:
    for data in (*MIXED, pydicom_file("emri_small.dcm")):
        study, series, sop = _ids(data)
        response = httpx.get(archive.url(study, series, sop), headers={"Accept": MULTIPART_ANY}, timeout=60)
        assert response.status_code == 200, response.text
        [(headers, body)] = parse_multipart(response)
        assert body == data
        assert headers["x-content-sha256"] == hashlib.sha256(data).hexdigest() == archive.sha(sop)
        assert response.headers["etag"] == f'"{archive.sha(sop)}"'
        syntax = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"

        single = httpx.get(
            archive.url(study, series, sop), headers={"Accept": "application/dicom; transfer-syntax=*"}, timeout=60
        )
        assert single.status_code == 200 and single.content == data
        assert single.headers["x-content-sha256"] == archive.sha(sop)


def test_study_and_series_stream_every_instance(archive: Archive) -> None:
    response = httpx.get(archive.url(archive.ct_study), headers={"Accept": MULTIPART_ANY}, timeout=60)
    assert response.status_code == 200
    parts = parse_multipart(response)
    assert len(parts) == 3
    for headers, body in parts:
        sop = _ids(body)[2]
        assert body == archive.originals[sop]
        assert headers["x-content-sha256"] == hashlib.sha256(body).hexdigest() == archive.sha(sop)
        assert headers["content-location"].endswith(f"/instances/{sop}")
    series = httpx.get(archive.url(archive.ct_study, archive.ct_series[0]), headers={"Accept": MULTIPART_ANY})
    assert len(parse_multipart(series)) == 2

    everything = parse_multipart(httpx.get(archive.url(MIXED_STUDY), headers={"Accept": MULTIPART_ANY}, timeout=60))
    assert sorted(body for _, body in everything) == sorted(MIXED)


def test_default_accept_is_explicit_vr_little_endian(archive: Archive) -> None:
    for data in MIXED:
        study, series, sop = _ids(data)
        response = httpx.get(archive.url(study, series, sop), timeout=60)
        assert response.status_code == 200, response.text
        [(headers, body)] = parse_multipart(response)
        assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.SOPInstanceUID == sop
        assert np.array_equal(ds.pixel_array, pixels(data))
        assert headers["x-content-sha256"] == hashlib.sha256(body).hexdigest()
        assert headers["x-original-sha256"] == archive.sha(sop)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2"])
def test_lossless_transcodes_are_pixel_exact(archive: Archive, syntax: str) -> None:
    sop = next(iter(archive.originals))  # a CT instance
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
    response = httpx.get(archive.url(archive.ct_study), headers={"Accept": accept}, timeout=60)
    assert response.status_code == 200, response.text
    for headers, body in parse_multipart(response):
        assert headers["content-type"] == f"application/dicom; transfer-syntax={syntax}"
        ds = pydicom.dcmread(io.BytesIO(body))
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(ds.pixel_array, pixels(archive.originals[ds.SOPInstanceUID]))
    assert sop


def test_preference_order_and_not_acceptable(archive: Archive) -> None:
    data = MIXED[1]  # JPEG lossless
    study, series, sop = _ids(data)
    # JPEG baseline is not offered; the next acceptable one is taken
    accept = (
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5'
    )
    [(_, body)] = parse_multipart(httpx.get(archive.url(study, series, sop), headers={"Accept": accept}))
    assert body == data
    refused = httpx.get(
        archive.url(study, series, sop),
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'},
    )
    assert refused.status_code == 406
    assert httpx.get(archive.url(study, series, sop), headers={"Accept": "image/jpeg"}).status_code == 406
    # HTJ2K is offered for single-sample images only: the RGB instance cannot be given that way
    rgb = _ids(pydicom_file("SC_rgb.dcm"))
    htj2k = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.201'
    assert httpx.get(archive.url(*rgb), headers={"Accept": htj2k}).status_code == 406
    # A study cannot be one application/dicom body
    assert httpx.get(archive.url(study), headers={"Accept": "application/dicom"}).status_code == 406


def test_metadata_bulkdata_and_frames(archive: Archive) -> None:
    data = pydicom_file("emri_small.dcm")
    original = pydicom.dcmread(io.BytesIO(data))
    study, series, sop = _ids(data)
    response = httpx.get(archive.url(study, series, sop, "/metadata"), timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    [item] = response.json()
    assert item["00080018"]["Value"] == [sop]
    assert item["00280008"]["Value"] == [10]
    uri = item["7FE00010"]["BulkDataURI"]
    assert uri.endswith(f"/instances/{sop}/bulkdata/7FE00010")
    [(_, value)] = parse_multipart(httpx.get(uri, timeout=60))
    assert value == original.PixelData

    frames = httpx.get(archive.url(study, series, sop, "/frames/1,3,10"), timeout=60)
    assert frames.status_code == 200
    parts = parse_multipart(frames)
    octets = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert [h["content-type"] for h, _ in parts] == [octets] * 3
    for (_, body), number in zip(parts, (1, 3, 10), strict=True):
        assert body == original.pixel_array[number - 1].astype("<u2").tobytes()

    # Frames of an encapsulated original are decoded
    jpeg = MIXED[1]
    [(_, frame)] = parse_multipart(httpx.get(archive.url(*_ids(jpeg), "/frames/1"), timeout=60))
    assert frame == pixels(jpeg).astype(pixels(jpeg).dtype.newbyteorder("<")).tobytes()

    study_metadata = httpx.get(archive.url(archive.ct_study, tail="/metadata"), timeout=60).json()
    assert len(study_metadata) == 3 and all(m["0020000D"]["Value"] == [archive.ct_study] for m in study_metadata)
    assert study_metadata[0]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]


def test_bad_requests(archive: Archive) -> None:
    study, series, sop = _ids(pydicom_file("emri_small.dcm"))
    cases: list[tuple[str, dict[str, str], int]] = [
        (archive.url("1.2.3.999"), {}, 404),
        (archive.url(study, "1.2.3.999"), {}, 404),
        (archive.url(study, series, "1.2.3.999"), {}, 404),
        (archive.url("not..a.uid"), {}, 400),
        (archive.url("1.2.3' OR '1'='1"), {}, 400),
        (archive.url(study, series, sop, "/frames/0"), {}, 400),
        (archive.url(study, series, sop, "/frames/1,,2"), {}, 400),
        (archive.url(study, series, sop, "/frames/11"), {}, 404),
        (archive.url(study, series, sop, "/frames/1"), {"Accept": "image/jpeg"}, 406),
        (archive.url(study, series, sop, "/bulkdata/xyz"), {}, 400),
        (archive.url(study, series, sop, "/bulkdata/00091001"), {}, 404),
        (archive.url(study, series, sop, "/metadata"), {"Accept": "application/dicom"}, 406),
    ]
    for url, headers, status in cases:
        response = httpx.get(url, headers=headers, timeout=60)
        assert response.status_code == status, (url, headers, response.status_code, response.text)
        assert response.json()["error"]


def test_dicomweb_client(archive: Archive) -> None:
    client = DICOMwebClient(f"{archive.http}/dicomweb")
    data = pydicom_file("emri_small.dcm")
    study, series, sop = _ids(data)
    ds = client.retrieve_instance(study, series, sop)
    assert ds.SOPInstanceUID == sop and np.array_equal(ds.pixel_array, pixels(data))
    instances = client.retrieve_study(archive.ct_study)
    assert sorted(d.SOPInstanceUID for d in instances) == sorted(
        _ids(b)[2] for b in archive.originals.values() if _ids(b)[0] == archive.ct_study
    )
    metadata = client.retrieve_instance_metadata(study, series, sop)
    assert metadata["00080018"]["Value"] == [sop]
    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[2, 4])
    original = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert frames == [original[1].astype("<u2").tobytes(), original[3].astype("<u2").tobytes()]


def test_viewer_flow_stow_then_wado(archive: Archive) -> None:
    """A viewer's way: STOW a series, read its metadata, fetch each frame, compare with pydicom."""
    study = ct_dataset(seed=40).StudyInstanceUID
    series = ct_dataset(seed=41).SeriesInstanceUID
    datasets = [ct_dataset(rows=64, cols=72, seed=50 + i, study_uid=study, series_uid=series) for i in range(3)]
    files = [part10_bytes(ds) for ds in datasets]
    assert stow(archive.http, files, study=study).status_code == 200
    client = DICOMwebClient(f"{archive.http}/dicomweb")
    found = client.search_for_instances(study, series, fields=["Rows", "Columns"])
    assert sorted(item["00080018"]["Value"][0] for item in found) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert all(item["00280010"]["Value"] == [64] for item in found)
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == 3
    for item in metadata:
        sop = item["00080018"]["Value"][0]
        original = next(ds for ds in datasets if ds.SOPInstanceUID == sop)
        [frame] = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
        rows, cols = item["00280010"]["Value"][0], item["00280011"]["Value"][0]
        assert np.array_equal(np.frombuffer(frame, "<u2").reshape(rows, cols), original.pixel_array)


def _corrupt_object(archive: Archive, uid: str) -> dict[str, Any]:
    row = archive.process.instance(uid)[0]
    path = archive.process.data_dir / "store" / row["object_key"]
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x55
    path.write_bytes(bytes(data))
    return row


def test_corrupt_object_is_never_served(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        process = start_serve(tmp_path, url, retrieve_cache_bytes=0)
        try:
            archive = Archive(process)
            ds = ct_dataset(rows=96, cols=96, seed=70)
            assert c_store(process.dicom_port, [ds]) == [0]
            process.wait_state(ds.SOPInstanceUID, {"archived"})
            target = archive.url(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            good = httpx.get(target, headers={"Accept": MULTIPART_ANY}, timeout=60)
            assert dataset_part(parse_multipart(good)[0][1]) == dataset_part(part10_bytes(ds))
            _corrupt_object(archive, ds.SOPInstanceUID)
            for _ in range(2):
                bad = httpx.get(target, headers={"Accept": MULTIPART_ANY}, timeout=60)
                assert bad.status_code == 500 and "corrupt" in bad.json()["error"]
                assert not bad.content.startswith(b"--")
            assert process.instance(ds.SOPInstanceUID)[0]["state"] == "corrupt"
            metrics = httpx.get(f"{process.http}/metrics", timeout=30).text
            assert 'archive_verification_failures_total{stage="retrieve"} 1.0' in metrics
            assert 'archive_instances{state="corrupt"} 1.0' in metrics
            log = process.log()
            assert "retrieval verification failed" in log
            assert "Doe^Jane" not in log and "TEST-PATIENT" not in log
        finally:
            process.stop()


def test_staged_instances_are_served_and_decode_timeout_is_503(tmp_path: Path) -> None:
    with database("sqlite", tmp_path) as url:
        # No compression workers: instances stay in staging; a decode can never finish in 1 ms
        process = start_serve(tmp_path, url, embedded_workers=0, retrieve_timeout_s=0.001)
        try:
            archive = Archive(process)
            data = pydicom_file("CT_small.dcm")
            assert stow(process.http, [data]).status_code == 200
            study, series, sop = _ids(data)
            assert process.instance(sop)[0]["state"] == "received"
            response = httpx.get(archive.url(study, series, sop), headers={"Accept": MULTIPART_ANY}, timeout=60)
            assert response.status_code == 200 and parse_multipart(response)[0][1] == data
        finally:
            process.stop()
        process = start_serve(
            tmp_path / "second", url, data_dir=tmp_path / "var", embedded_workers=1, retrieve_timeout_s=0.001
        )
        try:
            process.wait_state(sop, {"archived"})
            response = httpx.get(Archive(process).url(study, series, sop), timeout=60)
            assert response.status_code == 503 and response.headers["retry-after"]
        finally:
            process.stop()


def test_health_readiness_and_metrics(archive: Archive) -> None:
    # pytest-xdist may give this test its own module fixture: retrieve something first
    study, series, sop = _ids(pydicom_file("emri_small.dcm"))
    assert httpx.get(archive.url(study, series, sop), headers={"Accept": MULTIPART_ANY}, timeout=60).status_code == 200
    assert httpx.get(f"{archive.http}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{archive.http}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "object_store": "ok"}
    text = httpx.get(f"{archive.http}/metrics", timeout=30).text
    archived = re.search(r'^archive_instances\{state="archived"\} ([0-9.]+)$', text, re.MULTILINE)
    assert archived is not None and float(archived.group(1)) >= len(archive.originals)
    assert 'archive_ingested_total{source="stow",status="stored"}' in text
    assert 'archive_retrieve_seconds_count{source="archive"}' in text
    # From the embedded worker processes (multiprocess mode)
    assert re.search(r'^archive_compression_seconds_count\{codec="[a-z0-9-]+"\} [1-9]', text, re.MULTILINE), text
    assert re.search(r'^archive_archived_total\{codec="[a-z0-9-]+"\} [1-9]', text, re.MULTILINE)
