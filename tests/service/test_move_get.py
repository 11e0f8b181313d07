"""C-MOVE and C-GET against a real `serve`, with pynetdicom and dcmtk peers: originals go out byte
for byte in their own transfer syntax, a peer that refuses it gets Explicit VR LE (pixel exact),
sub-operation counts are right, cancel stops the transfer, a corrupt object is a failed
sub-operation, and an unknown destination is 0xA801."""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
)
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.archive_support import (
    ArchiveProcess,
    c_store,
    ct_dataset,
    database,
    dataset_part,
    free_port,
    mixed_syntax_study,
    part10_bytes,
    start_serve,
    stow,
)

SOP_CLASSES = (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, UltrasoundImageStorage)
EVERY_SYNTAX = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1, JPEG2000Lossless]
MIXED_STUDY = "1.2.826.0.1.3680043.8.498.2"
MIXED = mixed_syntax_study(MIXED_STUDY)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class StoreSCP:
    """A pynetdicom Storage SCP keeping what arrives: SOP Instance UID -> (syntax, encoded data set)."""

    def __init__(self, title: str, syntaxes: list[str], delay: float = 0.0) -> None:
        self.title, self.port, self.delay = title, free_port(), delay
        self.received: dict[str, tuple[str, bytes]] = {}
        ae = AE(ae_title=title)
        for sop_class in SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.on_store)]
        )

    def on_store(self, event: Any) -> int:
        time.sleep(self.delay)
        ds = event.dataset
        self.received[ds.SOPInstanceUID] = (str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0x0000


class Setup:
    def __init__(self, process: ArchiveProcess, scps: dict[str, StoreSCP], dcmtk_port: int) -> None:
        self.process, self.scps, self.dcmtk_port = process, scps, dcmtk_port
        self.originals: dict[str, bytes] = {}
        self.ct_study = ""
        self.mixed_study = ""
        self.big_study = ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("move")
    scps = {
        "PYSTORE": StoreSCP("PYSTORE", EVERY_SYNTAX),
        "PLAIN": StoreSCP("PLAIN", [ExplicitVRLittleEndian]),
        "SLOW": StoreSCP("SLOW", EVERY_SYNTAX, delay=0.3),
    }
    dcmtk_port = free_port()
    peers = ",".join(f"{title}=127.0.0.1:{scp.port}" for title, scp in scps.items())
    peers += f",DCMTK=127.0.0.1:{dcmtk_port}"
    with database("sqlite", tmp) as url:
        process = start_serve(tmp, url, dicom_peers=peers)
        try:
            setup = Setup(process, scps, dcmtk_port)
            ct_study = ct_dataset(seed=1).StudyInstanceUID
            ct_series = ct_dataset(seed=4).SeriesInstanceUID
            cts = [
                ct_dataset(rows=80, cols=64, seed=100 + i, study_uid=ct_study, series_uid=ct_series) for i in range(3)
            ]
            big_study = ct_dataset(seed=2).StudyInstanceUID
            bigs = [ct_dataset(rows=32, cols=32, seed=200 + i, study_uid=big_study) for i in range(8)]
            assert c_store(process.dicom_port, cts + bigs) == [0] * 11
            files = MIXED
            assert stow(process.http, files).status_code == 200
            for ds in cts + bigs:
                process.wait_state(ds.SOPInstanceUID, {"archived"})
                setup.originals[ds.SOPInstanceUID] = part10_bytes(ds)
            for data in files:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                process.wait_state(ds.SOPInstanceUID, {"archived"})
                setup.originals[ds.SOPInstanceUID] = data
                setup.mixed_study = ds.StudyInstanceUID
            setup.ct_study, setup.big_study = ct_study, big_study
            yield setup
        finally:
            process.stop()
            for scp in scps.values():
                scp.server.shutdown()


def _identifier(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _move(setup: Setup, destination: str, identifier: Dataset, model: Any = StudyRootQueryRetrieveInformationModelMove):
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", setup.process.dicom_port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    try:
        return list(assoc.send_c_move(identifier, destination, model))
    finally:
        assoc.release()


def test_move_sends_originals_unchanged(setup: Setup) -> None:
    scp = setup.scps["PYSTORE"]
    responses = _move(setup, "PYSTORE", _identifier("STUDY", StudyInstanceUID=setup.mixed_study))
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    assert final.NumberOfFailedSuboperations == 0
    for data in MIXED:
        original = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        syntax, encoded = scp.received[original.SOPInstanceUID]
        assert syntax == original.file_meta.TransferSyntaxUID
        assert encoded == dataset_part(data)


def test_move_patient_root_series_and_image_levels(setup: Setup) -> None:
    scp = setup.scps["PYSTORE"]
    uid = sorted(_ct_uids(setup))[0]
    ds = pydicom.dcmread(io.BytesIO(setup.originals[uid]), stop_before_pixels=True)
    scp.received.clear()
    identifier = _identifier(
        "IMAGE",
        PatientID=ds.PatientID,
        StudyInstanceUID=ds.StudyInstanceUID,
        SeriesInstanceUID=ds.SeriesInstanceUID,
        SOPInstanceUID=uid,
    )
    responses = _move(setup, "PYSTORE", identifier, PatientRootQueryRetrieveInformationModelMove)
    assert responses[-1][0].Status == 0x0000 and list(scp.received) == [uid]
    assert scp.received[uid][1] == dataset_part(setup.originals[uid])

    scp.received.clear()
    series = _identifier("SERIES", StudyInstanceUID=ds.StudyInstanceUID, SeriesInstanceUID=ds.SeriesInstanceUID)
    final = _move(setup, "PYSTORE", series)[-1][0]
    assert final.NumberOfCompletedSuboperations == len(scp.received) == 3


def _ct_uids(setup: Setup) -> set[str]:
    return {
        uid
        for uid, data in setup.originals.items()
        if pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID == setup.ct_study
    }


def test_move_falls_back_to_explicit_little_endian(setup: Setup) -> None:
    scp = setup.scps["PLAIN"]
    final = _move(setup, "PLAIN", _identifier("STUDY", StudyInstanceUID=setup.mixed_study))[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 3
    for data in MIXED:
        uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        syntax, encoded = scp.received[uid]
        assert syntax == ExplicitVRLittleEndian
        received = pydicom.dcmread(io.BytesIO(encoded), force=True)
        received.file_meta = pydicom.dataset.FileMetaDataset()
        received.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert np.array_equal(received.pixel_array, pydicom.dcmread(io.BytesIO(data)).pixel_array)


def test_move_unknown_destination_and_bad_identifier(setup: Setup) -> None:
    [(status, _)] = _move(setup, "NOBODY", _identifier("STUDY", StudyInstanceUID=setup.ct_study))
    assert status.Status == 0xA801
    responses = _move(setup, "PYSTORE", _identifier("NONSENSE", StudyInstanceUID=setup.ct_study))
    assert responses[-1][0].Status == 0xC514  # failure, unable to process
    nothing = _move(setup, "PYSTORE", _identifier("STUDY", StudyInstanceUID="1.2.3.4.5.6.7.8.9"))[-1][0]
    assert nothing.Status == 0x0000 and nothing.NumberOfCompletedSuboperations == 0


def test_move_cancel(setup: Setup) -> None:
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", setup.process.dicom_port, ae_title="LVPARCHIVE")
    assert assoc.is_established
    try:
        responses = assoc.send_c_move(
            _identifier("STUDY", StudyInstanceUID=setup.big_study), "SLOW", StudyRootQueryRetrieveInformationModelMove
        )
        statuses = []
        for status, _ in responses:
            statuses.append(status)
            if status.Status == 0xFF00 and len(statuses) == 1:
                context_id = assoc.accepted_contexts[0].context_id
                assoc.send_c_cancel(1, context_id)
    finally:
        assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations < 8


def test_get_on_the_same_association(setup: Setup) -> None:
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: Any) -> int:
        received[event.dataset.SOPInstanceUID] = (str(event.context.transfer_syntax), event.request.DataSet.getvalue())
        return 0

    ae = AE(ae_title="GETTER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class in (MRImageStorage, SecondaryCaptureImageStorage, UltrasoundImageStorage):
        # One context per syntax: the archive takes the one matching what it stores
        for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1):
            ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))
    assoc = ae.associate(
        "127.0.0.1",
        setup.process.dicom_port,
        ae_title="LVPARCHIVE",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        identifier = _identifier("STUDY", StudyInstanceUID=setup.mixed_study)
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    final = responses[-1][0]
    assert final.NumberOfCompletedSuboperations == 3 and final.Status == 0x0000
    for data in MIXED:
        original = pydicom.dcmread(io.BytesIO(data))
        syntax, encoded = received[original.SOPInstanceUID]
        if original.file_meta.TransferSyntaxUID in (ExplicitVRBigEndian, JPEGLosslessSV1):
            assert syntax == original.file_meta.TransferSyntaxUID and encoded == dataset_part(data)
        else:  # JPEG 2000 was not proposed: decompressed to Explicit VR LE
            assert syntax == ExplicitVRLittleEndian
            ds = pydicom.dcmread(io.BytesIO(encoded), force=True)
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_dcmtk_movescu_and_getscu(setup: Setup, tmp_path: Path) -> None:
    moved, got = tmp_path / "moved", tmp_path / "got"
    moved.mkdir()
    got.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "DCMTK", "+xa", "-od", str(moved), "+B", str(setup.dcmtk_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={setup.ct_study}"]
        subprocess.run(
            ["movescu", "-S", "-aet", "MOVER", "-aec", "LVPARCHIVE", "-aem", "DCMTK", *keys,
             "127.0.0.1", str(setup.process.dicom_port)],
            env=DCMTK_ENV, check=True, timeout=120, capture_output=True,
        )  # fmt: skip
    finally:
        storescp.terminate()
        storescp.wait(timeout=30)
    subprocess.run(
        ["getscu", "-S", "-aet", "GETTER", "-aec", "LVPARCHIVE", "+B", "-od", str(got), *keys,
         "127.0.0.1", str(setup.process.dicom_port)],
        env=DCMTK_ENV, check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    expected = {dataset_part(setup.originals[uid]) for uid in _ct_uids(setup)}
    for folder in (moved, got):
        files = [p for p in folder.iterdir() if p.is_file()]
        assert len(files) == 3, folder
        assert {dataset_part(p.read_bytes()) for p in files} == expected


def test_corrupt_instance_is_a_failed_sub_operation(setup: Setup) -> None:
    study = ct_dataset(seed=3).StudyInstanceUID
    datasets = [ct_dataset(rows=40, cols=40, seed=300 + i, study_uid=study) for i in range(2)]
    assert c_store(setup.process.dicom_port, datasets) == [0, 0]
    rows = [setup.process.wait_state(ds.SOPInstanceUID, {"archived"}) for ds in datasets]
    path = setup.process.data_dir / "store" / rows[0]["object_key"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    scp = setup.scps["PYSTORE"]
    scp.received.clear()
    final = _move(setup, "PYSTORE", _identifier("STUDY", StudyInstanceUID=study))[-1][0]
    assert final.Status == 0xB000  # warning: some sub-operations failed
    assert final.NumberOfFailedSuboperations == 1 and final.NumberOfCompletedSuboperations == 1
    assert list(scp.received) == [datasets[1].SOPInstanceUID]
    assert setup.process.instance(datasets[0].SOPInstanceUID)[0]["state"] == "corrupt"
