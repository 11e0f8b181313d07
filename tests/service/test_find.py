"""C-FIND against a real `serve` over real associations (pynetdicom and dcmtk's findscu), on SQLite
and PostgreSQL: Patient Root and Study Root at every level, matching, counts, failures, unsupported
keys, character sets, and C-CANCEL."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from service.db import make_engine, make_session_factory
from service.dicom.find import handle_find
from tests.service.query_data import CHARSET_FILES, INJECTION, Catalogue, loaded_archive

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
PENDING, PENDING_WARNING, SUCCESS = 0xFF00, 0xFF01, 0x0000


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def catalogue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalogue]:
    with loaded_archive(request.param, tmp_path_factory.mktemp(f"find-{request.param}")) as loaded:
        yield loaded


def identifier(level: str, charset: str | list[str] | None = None, **keys: Any) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(cat: Catalogue, query: Dataset, model: Any = STUDY_ROOT) -> tuple[list[int], list[Dataset]]:
    """Every status of one C-FIND, and the identifiers of the pending ones."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(STUDY_ROOT)
    ae.add_requested_context(PATIENT_ROOT)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", cat.archive.dicom_port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    statuses, found = [], []
    try:
        for status, ident in assoc.send_c_find(query, model):
            statuses.append(int(status.Status))
            if ident is not None and int(status.Status) in (PENDING, PENDING_WARNING):
                found.append(ident)
    finally:
        assoc.release()
    return statuses, found


def study_labels(cat: Catalogue, found: list[Dataset]) -> set[str]:
    return {cat.label(ds.StudyInstanceUID) for ds in found}


def test_study_root_study_level(catalogue: Catalogue) -> None:
    query = identifier(
        "STUDY",
        PatientName="Doe*",
        StudyInstanceUID="",
        StudyDate="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    statuses, found = c_find(catalogue, query)
    assert statuses == [PENDING] * 3 + [SUCCESS]
    assert study_labels(catalogue, found) == {"A", "B", "C"}
    study_a = next(ds for ds in found if ds.StudyInstanceUID == catalogue.study["A"])
    assert study_a.QueryRetrieveLevel == "STUDY"
    assert study_a.RetrieveAETitle == "LVPARCHIVE"
    assert str(study_a.PatientName) == "Doe^Jane"
    assert study_a.StudyDate == "20240102"
    assert list(study_a.ModalitiesInStudy) == ["CT", "MR"]
    assert study_a.NumberOfStudyRelatedSeries == 2 and study_a.NumberOfStudyRelatedInstances == 4
    # The keys asked for, plus the level, the unique key and the retrieve AE: nothing else
    assert {e.keyword for e in study_a} == {*query.dir(), "RetrieveAETitle"}


C_FIND_MATCHING = [
    ({"PatientName": "doe^jane"}, {"A", "B"}),
    ({"PatientName": "Doe^J?n?"}, {"A", "B"}),
    ({"PatientID": "PAT%2"}, {"C"}),
    ({"PatientID": "PAT_*"}, {"D"}),
    ({"PatientID": "pat-1"}, set()),
    ({"AccessionNumber": "A'1"}, {"C"}),
    ({"StudyDescription": INJECTION}, {"C"}),
    ({"StudyDescription": "*50%*"}, {"A"}),
    ({"StudyDate": "20240101-"}, {"A", "B"}),
    ({"StudyDate": "-20231231"}, {"C", "D"}),
    ({"StudyDate": "20231231-20240102"}, {"A", "C"}),
    ({"StudyTime": "-1015"}, {"A", "B"}),
    ({"ModalitiesInStudy": ["MR", "US"]}, {"A", "C"}),
    ({"ModalitiesInStudy": "OT"}, {"chrFren.dcm", "chrX1.dcm", "chrH31.dcm"}),
    ({"StudyInstanceUID": ["{A}", "{D}"]}, {"A", "D"}),
]


@pytest.mark.parametrize(("keys", "expected"), C_FIND_MATCHING, ids=[str(k) for k, _ in C_FIND_MATCHING])
def test_study_root_matching(catalogue: Catalogue, keys: dict[str, Any], expected: set[str]) -> None:
    def resolve(value: Any) -> Any:
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value.format(**catalogue.study) if "{" in value else value

    resolved = {k: resolve(v) for k, v in keys.items()}
    statuses, found = c_find(catalogue, identifier("STUDY", **{"StudyInstanceUID": "", **resolved}))
    assert statuses[-1] == SUCCESS and statuses.count(PENDING) == len(expected)
    assert study_labels(catalogue, found) == expected


def test_study_root_series_and_image_levels(catalogue: Catalogue) -> None:
    study_a = catalogue.study["A"]
    query = identifier(
        "SERIES",
        StudyInstanceUID=study_a,
        SeriesInstanceUID="",
        Modality="",
        SeriesNumber="",
        NumberOfSeriesRelatedInstances="",
    )
    statuses, found = c_find(catalogue, query)
    assert statuses == [PENDING, PENDING, SUCCESS]
    assert [(ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber) for ds in found] == [
        (catalogue.series["A1"], "CT", 1),
        (catalogue.series["A2"], "MR", 2),
    ]
    assert [ds.NumberOfSeriesRelatedInstances for ds in found] == [3, 1]
    assert {ds.QueryRetrieveLevel for ds in found} == {"SERIES"}
    _, found = c_find(catalogue, identifier("SERIES", StudyInstanceUID=study_a, Modality="MR"))
    assert [ds.SeriesInstanceUID for ds in found] == [catalogue.series["A2"]]  # unique key returned unasked

    query = identifier(
        "IMAGE",
        StudyInstanceUID=study_a,
        SeriesInstanceUID=catalogue.series["A1"],
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
        Rows=None,
    )
    statuses, found = c_find(catalogue, query)
    assert statuses == [PENDING] * 3 + [SUCCESS]
    assert [ds.SOPInstanceUID for ds in found] == catalogue.instances["A1"]
    assert [ds.InstanceNumber for ds in found] == [1, 2, 3]
    assert {ds.Rows for ds in found} == {16}
    query = identifier("IMAGE", StudyInstanceUID=study_a, SeriesInstanceUID=catalogue.series["A1"], InstanceNumber="2")
    _, found = c_find(catalogue, query)
    assert [ds.SOPInstanceUID for ds in found] == [catalogue.instances["A1"][1]]


def test_patient_root_levels(catalogue: Catalogue) -> None:
    query = identifier("PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedStudies="")
    statuses, found = c_find(catalogue, query, PATIENT_ROOT)
    assert statuses[-1] == SUCCESS
    by_id = {ds.PatientID: ds for ds in found}
    assert set(by_id) == {"PAT-1", "PAT%2", "PAT_3", *(pid for pid, _ in CHARSET_FILES.values())}
    assert by_id["PAT-1"].NumberOfPatientRelatedStudies == 2
    assert str(by_id["PAT_3"].PatientName) == "O'Neil^Ann"
    assert by_id["PAT-1"].QueryRetrieveLevel == "PATIENT"

    _, found = c_find(catalogue, identifier("STUDY", PatientID="PAT-1", StudyInstanceUID=""), PATIENT_ROOT)
    assert study_labels(catalogue, found) == {"A", "B"}
    _, found = c_find(
        catalogue,
        identifier("SERIES", PatientID="PAT-1", StudyInstanceUID=catalogue.study["A"], SeriesInstanceUID=""),
        PATIENT_ROOT,
    )
    assert [ds.SeriesInstanceUID for ds in found] == [catalogue.series["A1"], catalogue.series["A2"]]
    query = identifier(
        "IMAGE",
        PatientID="PAT_3",
        StudyInstanceUID=catalogue.study["D"],
        SeriesInstanceUID=catalogue.series["D1"],
        SOPInstanceUID="",
    )
    _, found = c_find(catalogue, query, PATIENT_ROOT)
    assert [ds.SOPInstanceUID for ds in found] == catalogue.instances["D1"]
    # The patient must be the study's
    _, found = c_find(
        catalogue, identifier("STUDY", PatientID="PAT_3", StudyInstanceUID=catalogue.study["A"]), PATIENT_ROOT
    )
    assert found == []


@pytest.mark.parametrize(
    ("model", "keys", "status"),
    [
        (STUDY_ROOT, {"StudyInstanceUID": ""}, 0xA900),  # no Query/Retrieve Level
        (STUDY_ROOT, {"QueryRetrieveLevel": "FRAME"}, 0xA900),
        (STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900),  # not in Study Root
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": ""}, 0xA900),  # study UID missing
        (STUDY_ROOT, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2", "SOPInstanceUID": ""}, 0xA900),
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2*"}, 0xC000),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, 0xA900),  # PatientID missing
        (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT*"}, 0xA900),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024"}, 0xC000),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "20240131-20240101"}, 0xC000),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}, 0xC000),
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2", "StudyTime": "2500"}, 0xC000),
    ],
)
def test_refused_identifiers(catalogue: Catalogue, model: Any, keys: dict[str, str], status: int) -> None:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    statuses, found = c_find(catalogue, query, model)
    assert statuses == [status] and found == []


def test_unsupported_keys_are_returned_empty(catalogue: Catalogue) -> None:
    query = identifier("STUDY", PatientID="PAT-1", StudyInstanceUID="", InstitutionName="Nowhere", SeriesDescription="")
    query.ReferencedStudySequence = []
    statuses, found = c_find(catalogue, query)
    # InstitutionName had a value the archive cannot match on: pending with the 0xFF01 warning
    assert statuses == [PENDING_WARNING, PENDING_WARNING, SUCCESS]
    assert study_labels(catalogue, found) == {"A", "B"}  # not filtered by it
    for ds in found:
        assert "InstitutionName" in ds and ds.InstitutionName == ""
        assert "SeriesDescription" in ds and ds.SeriesDescription == ""  # a series key at study level
        assert ds.ReferencedStudySequence == []
    statuses, _ = c_find(catalogue, identifier("STUDY", PatientID="PAT-1", InstitutionName=""))
    assert statuses == [PENDING, PENDING, SUCCESS]  # an empty unsupported key is no warning


def test_character_sets(catalogue: Catalogue) -> None:
    _, found = c_find(catalogue, identifier("STUDY", PatientName="Yamada^Tarou", StudyInstanceUID=""))
    (japanese,) = found
    assert japanese.SpecificCharacterSet == "ISO_IR 192"
    assert japanese.PatientName.alphabetic == "Yamada^Tarou"
    assert japanese.PatientName.ideographic == "山田^太郎"
    assert japanese.PatientName.phonetic == "やまだ^たろう"
    # Queries in other character sets are matched by their decoded text
    _, found = c_find(catalogue, identifier("STUDY", "ISO_IR 192", PatientName="山田^太郎", StudyInstanceUID=""))
    assert study_labels(catalogue, found) == {"chrH31.dcm"}
    _, found = c_find(catalogue, identifier("STUDY", "ISO_IR 100", PatientName="Buc^Jérôme", StudyInstanceUID=""))
    assert [str(ds.PatientName) for ds in found] == ["Buc^Jérôme"]
    query = identifier("STUDY", ["", "ISO 2022 IR 87"], PatientName="*=山田*", StudyInstanceUID="")
    _, found = c_find(catalogue, query)
    assert study_labels(catalogue, found) == {"chrH31.dcm"}
    _, found = c_find(catalogue, identifier("PATIENT", "ISO_IR 192", PatientName="王^小東", PatientID=""), PATIENT_ROOT)
    assert [ds.PatientID for ds in found] == ["X1EXAMPLE"]
    _, found = c_find(catalogue, identifier("STUDY", PatientID="PAT-1", PatientName=""))
    assert all("SpecificCharacterSet" not in ds for ds in found)  # ASCII: no character set


def findscu(cat: Catalogue, out: Path, *args: str) -> tuple[str, list[Dataset]]:
    out.mkdir()
    command = ["findscu", "-v", *args, "-X", "-od", str(out), "-aet", "FINDSCU", "-aec", "LVPARCHIVE"]
    completed = subprocess.run(
        [*command, "127.0.0.1", str(cat.archive.dicom_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        timeout=60,
        check=True,
    )
    log = completed.stdout.decode(errors="replace") + completed.stderr.decode(errors="replace")
    return log, [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def test_findscu(catalogue: Catalogue, tmp_path: Path) -> None:
    log, found = findscu(
        catalogue,
        tmp_path / "study",
        *("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=Doe*", "-k", "StudyInstanceUID"),
        *("-k", "StudyDate=20240101-", "-k", "NumberOfStudyRelatedInstances"),
    )
    assert "Received Final Find Response (Success)" in log
    assert {catalogue.label(ds.StudyInstanceUID): ds.NumberOfStudyRelatedInstances for ds in found} == {"A": 4, "B": 1}

    log, found = findscu(
        catalogue,
        tmp_path / "patient",
        *("-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=PAT%2", "-k", "PatientName"),
        *("-k", "NumberOfPatientRelatedInstances"),
    )
    assert [(str(ds.PatientName), ds.NumberOfPatientRelatedInstances) for ds in found] == [("DOE^JOHN", 1)]

    log, found = findscu(
        catalogue,
        tmp_path / "utf8",
        *("-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192"),
        *("-k", "PatientName=山田^太郎", "-k", "PatientID"),
    )
    assert [(ds.PatientID, ds.PatientName.ideographic) for ds in found] == [("H31EXAMPLE", "山田^太郎")]

    log, found = findscu(catalogue, tmp_path / "bad", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyDate=2024")
    assert "Failed: UnableToProcess" in log and found == []


class FakeEvent:
    """What handle_find reads of a pynetdicom Event; C-CANCEL arrives after `cancel_after` matches."""

    def __init__(self, query: Dataset, cancel_after: int | None = None, model: Any = STUDY_ROOT) -> None:
        self._identifier = query
        self.cancel_after = cancel_after
        self.sent = 0
        self.request = SimpleNamespace(AffectedSOPClassUID=model)
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="TESTSCU"), ae=SimpleNamespace(ae_title="ARC"))

    @property
    def identifier(self) -> Dataset:
        if self._identifier is None:
            raise ValueError("undecodable")
        return self._identifier

    @property
    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and self.sent >= self.cancel_after


def test_cancel_and_failures_in_the_handler(catalogue: Catalogue) -> None:
    engine = make_engine(catalogue.archive.database_url)
    factory = make_session_factory(engine)
    try:
        series = {"StudyInstanceUID": catalogue.study["A"], "SeriesInstanceUID": catalogue.series["A1"]}
        event = FakeEvent(identifier("IMAGE", **series))
        assert [status for status, _ in handle_find(event, factory)] == [PENDING] * 3  # Success is pynetdicom's

        event = FakeEvent(identifier("STUDY", StudyInstanceUID=""), cancel_after=2)
        responses = []
        for status, ds in handle_find(event, factory):
            responses.append((status, ds))
            event.sent += 1
        assert [status for status, _ in responses] == [PENDING, PENDING, 0xFE00]
        first = responses[0][1]
        assert responses[-1][1] is None and first is not None and first.RetrieveAETitle == "ARC"

        (failure,) = handle_find(FakeEvent(None), factory)  # type: ignore[arg-type]
        assert isinstance(failure[0], Dataset) and failure[0].Status == 0xC000 and failure[1] is None

        def broken() -> Any:
            raise RuntimeError("database gone")

        (failure,) = handle_find(FakeEvent(identifier("STUDY", StudyInstanceUID="")), broken)  # type: ignore[arg-type]
        assert isinstance(failure[0], Dataset) and failure[0].Status == 0xC001 and failure[1] is None
    finally:
        engine.dispose()


def test_logs_hold_no_patient_data(catalogue: Catalogue) -> None:
    c_find(catalogue, identifier("STUDY", PatientName="Doe^Jane", PatientID="PAT-1", StudyDate="20240102"))
    c_find(catalogue, identifier("STUDY", StudyDate="2024"))
    log = catalogue.archive.log()
    assert '"msg": "C-FIND"' in log and '"msg": "C-FIND refused"' in log
    for secret in ("Doe", "PAT-1", "20240102", "Yamada", "山田", INJECTION):
        assert secret not in log
