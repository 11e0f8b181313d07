"""Duplicates policy, the size limit and bad input, over real associations and real HTTP."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from service.dicomfile import InvalidInstance, inspect_file, is_valid_uid
from tests.archive_support import c_store, ct_dataset, part10_bytes, rebuild_from_store, start_serve, stow

DUPLICATE_REJECTED = 0xC002


@pytest.mark.parametrize("policy", ["keep-first", "overwrite", "reject"])
def test_duplicate_policy(tmp_path: Path, sqlite_url: str, policy: str) -> None:
    archive = start_serve(tmp_path, sqlite_url, duplicate_policy=policy)
    try:
        first = ct_dataset(seed=1)
        assert c_store(archive.dicom_port, [first]) == [0]
        archive.wait_state(first.SOPInstanceUID, {"archived"})
        # Identical dataset again, over STOW this time (file meta differs): success, nothing new
        response = stow(archive.http, [part10_bytes(first)])
        assert response.status_code == 200
        assert len(archive.instance(first.SOPInstanceUID)) == 1

        changed = copy.deepcopy(first)
        changed.SeriesDescription = "changed"
        statuses = c_store(archive.dicom_port, [changed])
        versions = archive.instance(first.SOPInstanceUID)
        if policy == "keep-first":
            assert statuses == [0]
            assert len(versions) == 1
            rebuilt = rebuild_from_store(archive.data_dir, versions[0]["object_key"])
            assert b"changed" not in rebuilt
        elif policy == "reject":
            assert statuses == [DUPLICATE_REJECTED]
            assert len(versions) == 1
        else:
            assert statuses == [0]
            newest = archive.wait_state(first.SOPInstanceUID, {"archived"}, version=2)
            older = archive.wait_state(first.SOPInstanceUID, {"superseded"}, version=1)
            assert older["object_key"] != newest["object_key"]
            assert b"changed" in rebuild_from_store(archive.data_dir, newest["object_key"])
            assert not (archive.data_dir / "store" / older["object_key"]).exists()
    finally:
        archive.stop()


def test_size_limit_at_limit_and_one_over(tmp_path: Path, sqlite_url: str) -> None:
    at_limit = ct_dataset(seed=3)
    limit = len(part10_bytes(at_limit))
    archive = start_serve(tmp_path, sqlite_url, max_instance_bytes=limit)
    try:
        assert stow(archive.http, [part10_bytes(at_limit)]).status_code == 200
        over = ct_dataset(seed=4)
        over_bytes = part10_bytes(over)
        over_bytes = over_bytes[:limit] + b"\x00" * (limit + 1 - len(over_bytes[:limit]))
        assert len(over_bytes) == limit + 1
        assert stow(archive.http, [over_bytes]).status_code == 413
        assert archive.instance(over.SOPInstanceUID) == []
        big = ct_dataset(rows=128, cols=128, seed=5)
        assert c_store(archive.dicom_port, [big]) == [0xA700]
        assert archive.instance(big.SOPInstanceUID) == []
        assert "larger than the size limit" in archive.log()
    finally:
        archive.stop()


def test_bad_input_is_refused_without_effect_on_others(tmp_path: Path, database_url: str) -> None:
    archive = start_serve(tmp_path, database_url)
    try:
        good = ct_dataset(seed=20)
        mismatch = ct_dataset(seed=21)
        mismatch.Rows = 128  # pixel data now half what the description needs
        path_uid = ct_dataset(seed=22)
        path_uid.SeriesInstanceUID = "1.2/../../etc"
        # Over one association: the bad ones fail, the good one after them still succeeds
        statuses = c_store(archive.dicom_port, [mismatch, path_uid, good])
        assert statuses[0] == 0xC000 and statuses[1] == 0xC000 and statuses[2] == 0
        archive.wait_state(good.SOPInstanceUID, {"archived"})
        assert archive.instance(mismatch.SOPInstanceUID) == []

        missing_uid = ct_dataset(seed=23)
        del missing_uid.SOPInstanceUID
        truncated = part10_bytes(ct_dataset(seed=24))
        truncated = truncated[: len(truncated) // 2]
        unknown_syntax = ct_dataset(seed=25)
        absurd = ct_dataset(seed=26)
        absurd.NumberOfFrames = 1_000_000_000
        not_dicom = b"hello, this is not DICOM at all" * 10
        parts = [
            part10_bytes(missing_uid),
            truncated,
            _raw_bytes(unknown_syntax),
            part10_bytes(absurd),
            not_dicom,
        ]
        response = stow(archive.http, parts)
        assert response.status_code == 409
        reasons = [item["00081197"]["Value"][0] for item in response.json()["00081198"]["Value"]]
        assert reasons == [0xC000] * 5
        versions = archive.instance(good.SOPInstanceUID)
        assert [v["state"] for v in versions] == ["archived"]
        log = archive.log()
        for reason in ("missing SOP Instance UID", "unknown transfer syntax", "pixel data holds"):
            assert reason in log
        assert "Doe" not in log and "TEST-PATIENT" not in log
    finally:
        archive.stop()


def _raw_bytes(ds: object) -> bytes:
    """The file with its meta group naming a transfer syntax nobody knows (same length)."""
    data = part10_bytes(ds)  # type: ignore[arg-type]
    explicit = b"1.2.840.10008.1.2.1\x00"
    assert data.count(explicit) >= 1
    return data.replace(explicit, b"1.2.3.4.5.6.7.8.9.1\x00", 1)


def test_uids_with_spaces_are_catalogued_as_sent_path_characters_are_not(tmp_path: Path) -> None:
    """Real equipment sends UIDs such as "REM SAMPLES 1" (a GDCM sample in the dev corpus): taken
    as sent.  Anything that could act on a path or split a value is still refused."""
    for uid in ("REM SAMPLES 1", "072495.0449", "1.2.840.10008.5.1.4.1.1.2", "1.2.AB.3"):
        assert is_valid_uid(uid), uid
    for uid in ("1.2/../../etc", "..", "1..2", " 1.2", "1.2 ", "1  2", "1.2\\3", "1.2\x00", "1" * 65, ""):
        assert not is_valid_uid(uid), uid
    ds = ct_dataset(seed=30)
    ds.SeriesInstanceUID = "REM SAMPLES 1"
    path = tmp_path / "spaced.dcm"
    path.write_bytes(part10_bytes(ds))
    assert inspect_file(path).series["series_instance_uid"] == "REM SAMPLES 1"
    ds.SeriesInstanceUID = "REM/SAMPLES 1"
    path.write_bytes(part10_bytes(ds))
    with pytest.raises(InvalidInstance, match="malformed SeriesInstanceUID"):
        inspect_file(path)
