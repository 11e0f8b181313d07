"""A small catalogue for the QIDO-RS and C-FIND tests: synthetic CT/MR/US instances with values that
exercise matching (SQL metacharacters, quotes, case, dates and times) plus pydicom's character set
samples (Latin-1, UTF-8 and ISO 2022 Japanese), loaded into a real `serve` once per module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from tests.archive_support import ArchiveProcess, c_store, ct_dataset, database, start_serve, stow

# pydicom's character set samples: file name -> (patient ID, patient name as decoded)
CHARSET_FILES = {
    "chrFren.dcm": ("SCSFREN", "Buc^Jérôme"),
    "chrX1.dcm": ("X1EXAMPLE", "Wang^XiaoDong=王^小東"),
    "chrH31.dcm": ("H31EXAMPLE", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}
INJECTION = "'; DROP TABLE study; --"


@dataclass
class Catalogue:
    archive: ArchiveProcess
    kind: str
    study: dict[str, str] = field(default_factory=dict)  # label -> StudyInstanceUID
    series: dict[str, str] = field(default_factory=dict)  # label -> SeriesInstanceUID
    instances: dict[str, list[str]] = field(default_factory=dict)  # series label -> SOP Instance UIDs

    def label(self, study_uid: str) -> str:
        return next(k for k, v in self.study.items() if v == study_uid)


# Patient-level and study-level values of the synthetic studies
PATIENTS = {
    "jane": {"PatientName": "Doe^Jane", "PatientID": "PAT-1", "PatientBirthDate": "19800101", "PatientSex": "F"},
    "john": {"PatientName": "DOE^JOHN", "PatientID": "PAT%2", "PatientSex": "M"},
    "ann": {"PatientName": "O'Neil^Ann", "PatientID": "PAT_3"},
}
STUDIES = {
    "A": ("jane", {"StudyDate": "20240102", "StudyTime": "101500", "AccessionNumber": "ACC-1", "StudyID": "S1",
                   "StudyDescription": "Head 50% dose", "ReferringPhysicianName": "Smith^John"}),
    "B": ("jane", {"StudyDate": "20240215", "StudyTime": "083000", "AccessionNumber": "ACC_2",
                   "StudyDescription": "Chest_low"}),
    "C": ("john", {"StudyDate": "20231231", "StudyTime": "235959", "AccessionNumber": "A'1",
                   "StudyDescription": INJECTION}),
    "D": ("ann", {"StudyDate": "20220610", "StudyTime": "120000", "AccessionNumber": "ACC-4",
                  "StudyDescription": "Abdomen"}),
}  # fmt: skip
# series label -> (study, modality, series number, description, instances)
SERIES = {
    "A1": ("A", "CT", 1, "axial", 3),
    "A2": ("A", "MR", 2, "t1_mpr", 1),
    "B1": ("B", "CT", 1, "chest", 1),
    "C1": ("C", "US", 1, "x_y%z", 1),
    "D1": ("D", "CT", 5, "abdomen", 2),
}
SYNTHETIC_STUDIES = set(STUDIES)
ALL_STUDIES = SYNTHETIC_STUDIES | {name for name in CHARSET_FILES}


def synthetic_datasets(catalogue: Catalogue) -> list[Dataset]:
    datasets = []
    for label in STUDIES:
        catalogue.study[label] = generate_uid()
    seed = 0
    for series_label, (study_label, modality, number, description, count) in SERIES.items():
        series_uid = catalogue.series[series_label] = generate_uid()
        patient, study_values = STUDIES[study_label]
        for index in range(count):
            seed += 1
            ds = ct_dataset(16, 16, seed=seed, study_uid=catalogue.study[study_label], series_uid=series_uid)
            for keyword, value in {**PATIENTS[patient], **study_values}.items():
                setattr(ds, keyword, value)
            ds.Modality = modality
            ds.SeriesNumber = number
            ds.SeriesDescription = description
            ds.InstanceNumber = index + 1
            if modality == "MR":
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            catalogue.instances.setdefault(series_label, []).append(ds.SOPInstanceUID)
            datasets.append(ds)
    return datasets


@contextlib.contextmanager
def loaded_archive(kind: str, tmp_path: Path) -> Iterator[Catalogue]:
    """`serve` without a compression worker (instances stay `received`: visible, and no CPU spent),
    loaded over C-STORE (synthetic) and STOW-RS (the character set samples, byte for byte)."""
    with database(kind, tmp_path) as url:
        archive = start_serve(tmp_path, url, embedded_workers=0)
        try:
            catalogue = Catalogue(archive, kind)
            datasets = synthetic_datasets(catalogue)
            assert c_store(archive.dicom_port, datasets) == [0] * len(datasets)
            parts = []
            for name in CHARSET_FILES:
                path = Path(get_charset_files(name)[0])
                parts.append(path.read_bytes())
                ds = dcmread(path, stop_before_pixels=True)
                catalogue.study[name] = ds.StudyInstanceUID
            response = stow(archive.http, parts)
            assert response.status_code == 200, response.text
            yield catalogue
        finally:
            archive.stop()
