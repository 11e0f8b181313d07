"""QIDO-RS against a real `serve` over HTTP (httpx and dicomweb-client), on SQLite and PostgreSQL:
matching rules, levels, counts, includefield, paging, errors, character sets; and the engine's
visibility rules on catalog rows written directly."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from service.catalog.query import (
    MAX_LIMIT,
    Level,
    QueryError,
    matching_instances,
    parse_qido,
    query_from_identifier,
    run_query,
    search_page,
)
from service.catalog.tables import Instance, Patient, Series, Study
from service.db import make_engine, make_session_factory, migrate
from tests.service.query_data import CHARSET_FILES, INJECTION, Catalogue, loaded_archive


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def catalogue(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalogue]:
    with loaded_archive(request.param, tmp_path_factory.mktemp(f"qido-{request.param}")) as loaded:
        yield loaded


def get(cat: Catalogue, path: str, params: Any = None, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{cat.archive.http}/dicomweb{path}", params=params, timeout=30, **kwargs)


def search(cat: Catalogue, path: str, params: Any = None) -> list[dict[str, Any]]:
    response = get(cat, path, params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body = response.json()
    assert isinstance(body, list)
    return body


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def studies(cat: Catalogue, params: Any) -> set[str]:
    return {cat.label(value(item, "0020000D")) for item in search(cat, "/studies", params)}


JAPANESE = "chrH31.dcm"
FRENCH = "chrFren.dcm"
CHINESE = "chrX1.dcm"
ALL = {"A", "B", "C", "D", FRENCH, CHINESE, JAPANESE}

MATCHING = [
    # PN: case-insensitive, wildcards, component groups
    ({"PatientName": "Doe^Jane"}, {"A", "B"}),
    ({"PatientName": "doe^jane"}, {"A", "B"}),
    ({"PatientName": "DOE*"}, {"A", "B", "C"}),
    ({"PatientName": "Doe^J?n?"}, {"A", "B"}),
    ({"PatientName": "O'Neil^Ann"}, {"D"}),
    ({"PatientName": "Yamada^Tarou"}, {JAPANESE}),
    ({"PatientName": "山田^太郎"}, {JAPANESE}),
    ({"PatientName": "やまだ*"}, {JAPANESE}),
    ({"PatientName": "Buc^Jérôme"}, {FRENCH}),
    ({"PatientName": "Wang^XiaoDong"}, {CHINESE}),
    ({"PatientName": "王^小東"}, {CHINESE}),
    ({"PatientName": ""}, ALL),
    ({"PatientName": "*"}, ALL),
    # Other strings: case-sensitive; % _ \ and quotes are literal
    ({"PatientID": "PAT-1"}, {"A", "B"}),
    ({"PatientID": "pat-1"}, set()),
    ({"PatientID": "PAT%2"}, {"C"}),
    ({"PatientID": "PAT%*"}, {"C"}),
    ({"PatientID": "PAT_3"}, {"D"}),
    ({"PatientID": "PAT_*"}, {"D"}),
    ({"PatientID": "PAT?3"}, {"D"}),
    ({"PatientID": "PAT?"}, set()),
    ({"00100020": "PAT-1"}, {"A", "B"}),
    ({"AccessionNumber": "ACC_2"}, {"B"}),
    ({"AccessionNumber": "ACC-?"}, {"A", "D"}),
    ({"AccessionNumber": "A'1"}, {"C"}),
    ({"StudyDescription": INJECTION}, {"C"}),
    ({"StudyDescription": "*DROP TABLE*"}, {"C"}),
    ({"StudyDescription": "*50%*"}, {"A"}),
    ({"StudyDescription": "*_*"}, {"B"}),
    ({"StudyDescription": "*\\*"}, set()),
    ({"StudyDescription": "head*"}, set()),
    ({"StudyDescription": "Head*"}, {"A"}),
    ({"PatientBirthDate": "19800101"}, {"A", "B"}),
    # Dates and times: single values and the three range forms
    ({"StudyDate": "20240102"}, {"A"}),
    ({"StudyDate": "20240101-20240131"}, {"A"}),
    ({"StudyDate": "20240101-"}, {"A", "B"}),
    ({"StudyDate": "-20231231"}, {"C", "D"}),
    ({"StudyDate": "20231231-20240102"}, {"A", "C"}),
    ({"StudyTime": "080000-090000"}, {"B"}),
    ({"StudyTime": "2359-"}, {"C"}),
    ({"StudyTime": "-1015"}, {"A", "B"}),
    # UID lists, with commas or backslashes
    ({"StudyInstanceUID": "{A},{C}"}, {"A", "C"}),
    ({"0020000D": "{A}\\{D}"}, {"A", "D"}),
    # Modalities: any of the study's, any of the listed
    ({"ModalitiesInStudy": "MR"}, {"A"}),
    ({"ModalitiesInStudy": "CT"}, {"A", "B", "D"}),
    ({"ModalitiesInStudy": "MR,US"}, {"A", "C"}),
    ({"ModalitiesInStudy": "OT"}, {FRENCH, CHINESE, JAPANESE}),
    ({"ModalitiesInStudy": "C*"}, {"A", "B", "D"}),
    # Keys of lower levels: the study has a matching series/instance
    ({"Modality": "US"}, {"C"}),
    ({"SeriesDescription": "x_y%z"}, {"C"}),
    ({"SOPClassUID": str(MRImageStorage)}, {"A"}),
    # Several keys: all hold; a key given twice: both hold
    ({"PatientName": "Doe^Jane", "StudyDate": "20240201-"}, {"B"}),
    ([("PatientName", "Doe*"), ("PatientName", "*Jane")], {"A", "B"}),
    ({"PatientID": "NOPE"}, set()),
]


@pytest.mark.parametrize(("params", "expected"), MATCHING, ids=[str(p) for p, _ in MATCHING])
def test_study_matching(catalogue: Catalogue, params: Any, expected: set[str]) -> None:
    items = params.items() if isinstance(params, dict) else params
    resolved = [(k, v.format(**catalogue.study) if "{" in v else v) for k, v in items]
    assert studies(catalogue, resolved) == expected


def test_study_attributes_counts_and_retrieve_urls(catalogue: Catalogue) -> None:
    body = search(catalogue, "/studies")
    assert len(body) == len(ALL)
    by_label = {catalogue.label(value(item, "0020000D")): item for item in body}
    study_a = by_label["A"]
    assert value(study_a, "00100010") == {"Alphabetic": "Doe^Jane"}
    assert value(study_a, "00100020") == "PAT-1"
    assert value(study_a, "00080020") == "20240102"
    assert value(study_a, "00080050") == "ACC-1"
    assert value(study_a, "00200010") == "S1"
    assert value(study_a, "00080090") == {"Alphabetic": "Smith^John"}
    assert study_a["00080061"]["Value"] == ["CT", "MR"]
    assert value(study_a, "00201206") == 2  # NumberOfStudyRelatedSeries
    assert value(study_a, "00201208") == 4  # NumberOfStudyRelatedInstances
    assert value(study_a, "00080056") == "ONLINE"
    base = f"{catalogue.archive.http}/dicomweb/studies/"
    assert value(study_a, "00081190") == base + quote(catalogue.study["A"])
    # Required keys are present (empty) even without a value
    assert by_label["B"]["00200010"] == {"vr": "SH"}
    assert by_label["C"]["00100030"] == {"vr": "DA"}
    assert value(by_label["D"], "00201208") == 2
    # The injection attempt was a value like any other: every table is still there
    (injected,) = search(catalogue, "/studies", {"PatientID": "PAT%2", "includefield": "StudyDescription"})
    assert value(injected, "00081030") == INJECTION
    assert len(search(catalogue, "/instances")) == 11


def test_series_and_instance_levels(catalogue: Catalogue) -> None:
    study_a, series_a1 = catalogue.study["A"], catalogue.series["A1"]
    series = search(catalogue, f"/studies/{study_a}/series")
    assert [value(s, "0020000E") for s in series] == [series_a1, catalogue.series["A2"]]
    assert [value(s, "00201209") for s in series] == [3, 1]
    assert [value(s, "00080060") for s in series] == ["CT", "MR"]
    assert value(series[0], "0008103E") == "axial"
    assert value(series[0], "00081190") == f"{catalogue.archive.http}/dicomweb/studies/{study_a}/series/{series_a1}"
    assert "00100010" not in series[0]  # study-scoped: no study/patient attributes
    assert [value(s, "0020000E") for s in search(catalogue, f"/studies/{study_a}/series", {"Modality": "MR"})] == [
        catalogue.series["A2"]
    ]
    assert search(catalogue, f"/studies/{study_a}/series", {"SeriesNumber": "2"})[0]["0020000E"]["Value"] == [
        catalogue.series["A2"]
    ]

    instances = search(catalogue, f"/studies/{study_a}/series/{series_a1}/instances")
    assert [value(i, "00080018") for i in instances] == catalogue.instances["A1"]
    assert [value(i, "00200013") for i in instances] == [1, 2, 3]
    assert {value(i, "00280010") for i in instances} == {16}
    assert {value(i, "00280100") for i in instances} == {16}
    assert value(instances[0], "00080016") == str(CTImageStorage)
    sop = catalogue.instances["A1"][0]
    assert value(instances[0], "00081190") == (
        f"{catalogue.archive.http}/dicomweb/studies/{study_a}/series/{series_a1}/instances/{sop}"
    )
    assert len(search(catalogue, f"/studies/{study_a}/instances")) == 4
    only = search(catalogue, f"/studies/{study_a}/series/{series_a1}/instances", {"InstanceNumber": "2"})
    assert [value(i, "00080018") for i in only] == [catalogue.instances["A1"][1]]
    # Study-scoped instances carry series attributes; unscoped ones study attributes too
    assert "0008103E" in search(catalogue, f"/studies/{study_a}/instances")[0]
    found = search(catalogue, "/instances", {"PatientID": "PAT_3"})
    assert [value(i, "00080018") for i in found] == catalogue.instances["D1"]
    assert value(found[0], "00100010") == {"Alphabetic": "O'Neil^Ann"}
    assert value(found[0], "00200011") == 5
    all_series = search(catalogue, "/series", {"Modality": "CT"})
    assert {value(s, "0020000E") for s in all_series} == {catalogue.series[k] for k in ("A1", "B1", "D1")}
    assert value(all_series[0], "00100020") == "PAT-1"  # relational: patient/study attributes returned
    assert [value(i, "00080018") for i in search(catalogue, "/instances", {"SOPClassUID": str(MRImageStorage)})] == (
        catalogue.instances["A2"]
    )


def test_includefield(catalogue: Catalogue) -> None:
    study_a = catalogue.study["A"]
    item = search(catalogue, "/studies", {"StudyInstanceUID": study_a, "includefield": "StudyDescription,00100021"})[0]
    assert value(item, "00081030") == "Head 50% dose"
    assert item["00100021"] == {"vr": "LO"}  # IssuerOfPatientID: included, empty
    assert "00081030" not in search(catalogue, "/studies", {"StudyInstanceUID": study_a})[0]
    repeated = [("StudyInstanceUID", study_a), ("includefield", "StudyDescription"), ("includefield", "PatientSex")]
    item = search(catalogue, "/studies", repeated)[0]
    assert value(item, "00081030") == "Head 50% dose" and value(item, "00100040") == "F"
    item = search(catalogue, "/studies", {"StudyInstanceUID": study_a, "includefield": "all"})[0]
    assert item["00080062"]["Value"] == [str(CTImageStorage), str(MRImageStorage)]  # SOPClassesInStudy
    assert value(item, "00201200") == 2  # NumberOfPatientRelatedStudies
    assert value(item, "00201204") == 5  # NumberOfPatientRelatedInstances
    series = search(catalogue, f"/studies/{study_a}/series", {"includefield": "BodyPartExamined,StudyDescription"})
    assert series[0]["00180015"] == {"vr": "CS"} and value(series[0], "00081030") == "Head 50% dose"
    # A key below the level cannot be returned: a warning, not an error
    response = get(catalogue, "/studies", {"StudyInstanceUID": study_a, "includefield": "SeriesDescription"})
    assert response.status_code == 200 and "0008103E" not in response.json()[0]
    assert "SeriesDescription" in response.headers["warning"]


def test_paging_is_stable(catalogue: Catalogue) -> None:
    everything = [value(i, "0020000D") for i in search(catalogue, "/studies")]
    pages = []
    for offset in range(0, 9, 3):
        response = get(catalogue, "/studies", {"limit": 3, "offset": offset})
        assert response.status_code == 200
        pages.append([value(i, "0020000D") for i in response.json()])
        more = "additional results" in response.headers.get("warning", "")
        assert more == (offset + 3 < len(everything))
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [uid for page in pages for uid in page] == everything
    assert [value(i, "0020000D") for i in search(catalogue, "/studies", {"limit": 3, "offset": 3})] == pages[1]
    assert search(catalogue, "/studies", {"offset": 100}) == []
    response = get(catalogue, "/studies", {"limit": 0})
    assert response.json() == [] and "additional results" in response.headers["warning"]
    response = get(catalogue, "/studies", {"limit": MAX_LIMIT + 1})
    assert len(response.json()) == len(everything) and str(MAX_LIMIT) in response.headers["warning"]
    instances = [value(i, "00080018") for i in search(catalogue, "/instances", {"limit": 4, "offset": 2})]
    assert instances == [value(i, "00080018") for i in search(catalogue, "/instances")][2:6]


@pytest.mark.parametrize(
    ("path", "params", "status", "reason"),
    [
        ("/studies", {"limit": "abc"}, 400, "limit"),
        ("/studies", {"limit": "-1"}, 400, "limit"),
        ("/studies", {"offset": "1.5"}, 400, "offset"),
        ("/studies", {"NotAKeyword": "x"}, 400, "NotAKeyword"),
        ("/studies", {"includefield": "NotAKeyword"}, 400, "NotAKeyword"),
        ("/studies", {"StudyDate": "2024"}, 400, "StudyDate"),
        ("/studies", {"StudyDate": "20240131-20240101"}, 400, "StudyDate"),
        ("/studies", {"StudyDate": "20240230"}, 400, "StudyDate"),
        ("/studies", {"StudyDate": "2024*"}, 400, "StudyDate"),
        ("/studies", {"StudyTime": "25"}, 400, "StudyTime"),
        ("/studies", {"StudyInstanceUID": "1.2.*"}, 400, "StudyInstanceUID"),
        ("/series", {"SeriesNumber": "two"}, 400, "SeriesNumber"),
        ("/studies", {"fuzzymatching": "maybe"}, 400, "fuzzymatching"),
        ("/studies/1..2/series", {}, 400, "StudyInstanceUID"),
        ("/studies/1.2.3.999/series", {}, 404, "study"),
        ("/studies/1.2.3.999/instances", {}, 404, "study"),
        ("/studies/{A}/series/1.2.3.999/instances", {}, 404, "series"),
        ("/studies/{B}/series/{A1}/instances", {}, 404, "series"),
    ],
)
def test_bad_requests(catalogue: Catalogue, path: str, params: dict[str, str], status: int, reason: str) -> None:
    response = get(catalogue, path.format(**catalogue.study, **catalogue.series), params)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]


def test_ignored_parameters_warn(catalogue: Catalogue) -> None:
    response = get(catalogue, "/studies", {"InstitutionName": "Nowhere", "fuzzymatching": "true"})
    assert response.status_code == 200
    assert len(response.json()) == len(ALL)  # not filtered
    warnings = response.headers.get_list("warning")
    assert any(w.startswith("299 ") and "InstitutionName" in w for w in warnings)
    assert any("fuzzymatching" in w for w in warnings)
    response = get(catalogue, "/studies", {"NumberOfStudyRelatedInstances": "4"})
    assert len(response.json()) == len(ALL) and "NumberOfStudyRelatedInstances" in response.headers["warning"]
    assert "warning" not in get(catalogue, "/studies", {"fuzzymatching": "false"}).headers


@pytest.mark.parametrize(
    ("accept", "status"),
    [
        (None, 200),
        ("application/dicom+json", 200),
        ("application/json", 200),
        ("*/*", 200),
        ("application/dicom+json, application/json", 200),
        ("application/xml", 406),
        ('multipart/related; type="application/dicom"', 406),
        ("application/dicom+json; q=0", 406),
    ],
)
def test_accept(catalogue: Catalogue, accept: str | None, status: int) -> None:
    headers = {"Accept": accept} if accept is not None else {}
    response = get(catalogue, "/studies", {"PatientID": "PAT-1"}, headers=headers)
    assert response.status_code == status


def test_character_sets_in_json(catalogue: Catalogue) -> None:
    response = get(catalogue, "/studies", {"PatientName": "山田^太郎"})
    assert response.status_code == 200
    assert "山田^太郎".encode() in response.content  # UTF-8 on the wire, not \u escapes
    (item,) = response.json()
    assert value(item, "00100010") == {
        "Alphabetic": "Yamada^Tarou",
        "Ideographic": "山田^太郎",
        "Phonetic": "やまだ^たろう",
    }
    assert item["00080005"]["Value"] == ["ISO_IR 192"]
    assert value(item, "00100020") == CHARSET_FILES[JAPANESE][0]
    (french,) = search(catalogue, "/studies", {"PatientID": "SCSFREN"})
    assert value(french, "00100010") == {"Alphabetic": "Buc^Jérôme"}
    (plain,) = search(catalogue, "/studies", {"StudyInstanceUID": catalogue.study["D"]})
    assert "00080005" not in plain  # ASCII only: no character set needed


def test_dicomweb_client(catalogue: Catalogue) -> None:
    client = DICOMwebClient(url=f"{catalogue.archive.http}/dicomweb")
    found = client.search_for_studies(search_filters={"PatientName": "Doe*"}, fields=["StudyDescription"], limit=2)
    assert len(found) == 2
    datasets = [Dataset.from_json(item) for item in found]
    assert {catalogue.label(ds.StudyInstanceUID) for ds in datasets} <= {"A", "B", "C"}
    assert all("StudyDescription" in ds for ds in datasets)
    remaining = client.search_for_studies(search_filters={"PatientName": "Doe*"}, limit=1, get_remaining=True)
    assert {catalogue.label(Dataset.from_json(i).StudyInstanceUID) for i in remaining} == {"A", "B", "C"}
    uids = [catalogue.study["A"], catalogue.study["D"]]
    listed = client.search_for_studies(search_filters={"StudyInstanceUID": uids})
    assert {Dataset.from_json(i).StudyInstanceUID for i in listed} == set(uids)
    series = client.search_for_series(study_instance_uid=catalogue.study["A"], search_filters={"Modality": "CT"})
    assert [Dataset.from_json(s).SeriesInstanceUID for s in series] == [catalogue.series["A1"]]
    instances = client.search_for_instances(
        study_instance_uid=catalogue.study["A"], series_instance_uid=catalogue.series["A1"]
    )
    assert [Dataset.from_json(i).SOPInstanceUID for i in instances] == catalogue.instances["A1"]
    (japanese,) = client.search_for_studies(search_filters={"PatientName": "Yamada*"})
    assert str(Dataset.from_json(japanese).PatientName) == CHARSET_FILES[JAPANESE][1]
    assert client.search_for_studies(search_filters={"PatientID": "NOPE"}) == []


# ------------------------------------------------------------------------------ engine, rows written directly


def _instance(series: Series, uid: str, *, version: int = 1, state: str = "received", staging: str | None = "k",
              number: int = 1) -> Instance:  # fmt: skip
    return Instance(
        sop_instance_uid=uid,
        version=version,
        series_pk=series.id,
        sop_class_uid=str(CTImageStorage),
        instance_number=number,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        source="stow",
        original_bytes=1,
        original_sha256="0" * 64,
        dataset_sha256="0" * 64,
        state=state,
        staging_key=staging,
    )


def test_visibility_versions_and_counts(database_url: str) -> None:
    """Superseded versions, failed ones without bytes and older versions of a re-sent instance are
    not seen; entities with nothing visible are not returned; counts follow."""
    migrate(database_url)
    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    try:
        with factory() as session:
            patient, empty_patient = Patient(patient_id="P1", patient_name="A^B"), Patient(patient_id="P2")
            session.add_all([patient, empty_patient])
            session.flush()
            study = Study(study_instance_uid="1.1", patient_pk=patient.id, modalities_in_study="CT")
            hidden = Study(study_instance_uid="1.2", patient_pk=empty_patient.id)
            session.add_all([study, hidden])
            session.flush()
            series = Series(series_instance_uid="2.1", study_pk=study.id, modality="CT")
            failed_series = Series(series_instance_uid="2.2", study_pk=study.id, modality="MR")
            hidden_series = Series(series_instance_uid="2.3", study_pk=hidden.id)
            session.add_all([series, failed_series, hidden_series])
            session.flush()
            session.add_all(
                [
                    _instance(series, "3.1", state="archived", staging=None),
                    _instance(series, "3.2", state="superseded", staging=None),
                    _instance(series, "3.2", version=2, state="archived", staging=None),  # replaced by v3 ...
                    _instance(series, "3.2", version=3, state="received", number=2),  # ... still compressing
                    _instance(series, "3.3", state="archived", staging=None, number=3),
                    _instance(series, "3.3", version=2, state="failed", staging=None),  # no bytes: v1 stays
                    _instance(series, "3.4", state="failed", staging="kept", number=4),  # bytes held: visible
                    _instance(failed_series, "3.5", state="failed", staging=None),
                    _instance(hidden_series, "3.6", state="superseded", staging=None),
                ]
            )
            session.commit()

            def run(level: Level, params: list[tuple[str, str]], scope: dict[str, str] | None = None) -> list[Dataset]:
                return list(run_query(session, parse_qido(level, params, scope)))

            (only,) = run(Level.STUDY, [("includefield", "all")])
            assert only.StudyInstanceUID == "1.1"
            assert only.NumberOfStudyRelatedInstances == 4 and only.NumberOfStudyRelatedSeries == 1
            assert only.NumberOfPatientRelatedInstances == 4 and only.NumberOfPatientRelatedStudies == 1
            assert [s.SeriesInstanceUID for s in run(Level.SERIES, [])] == ["2.1"]
            rows = run(Level.IMAGE, [])
            assert [r.SOPInstanceUID for r in rows] == ["3.1", "3.2", "3.3", "3.4"]  # primary key order
            assert [r.InstanceNumber for r in rows] == [1, 2, 3, 4]
            assert run(Level.STUDY, [("ModalitiesInStudy", "MR")]) == []  # only failed MR instances
            assert run(Level.STUDY, [("PatientID", "P2")]) == []

            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = ["1.1", "1.2"]
            chosen = matching_instances(session, query_from_identifier(identifier, "study"))
            assert [(i.sop_instance_uid, i.version) for i in chosen] == [("3.1", 1), ("3.2", 3), ("3.3", 1), ("3.4", 1)]
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "PATIENT"
            identifier.PatientID = "P1"
            identifier.NumberOfPatientRelatedSeries = None
            (patient_ds,) = run_query(session, query_from_identifier(identifier, "patient"))
            assert patient_ds.NumberOfPatientRelatedSeries == 1 and patient_ds.QueryRetrieveLevel == "PATIENT"
            page = search_page(session, parse_qido(Level.IMAGE, [("limit", "2"), ("offset", "1")]))
            assert [d.SOPInstanceUID for d in page.datasets] == ["3.2", "3.3"] and page.more
    finally:
        engine.dispose()


def test_parse_errors_name_the_key() -> None:
    with pytest.raises(QueryError, match="PatientBirthDate"):
        parse_qido(Level.STUDY, [("PatientBirthDate", "1980-1990")])
    with pytest.raises(QueryError, match="SOPInstanceUID"):
        parse_qido(Level.IMAGE, [("SOPInstanceUID", "1.2.3?")])
    query = parse_qido(Level.STUDY, [("StudyDate", "-"), ("PatientName", "*")])
    assert query.matches == []  # both universal
    assert parse_qido(Level.IMAGE, [("Rows", "512")]).matches[0].terms[0].value == 512
