"""Storage Commitment Push Model over real associations: the report comes on the requesting
association while it is open, else on a new association to the configured peer, and names an
instance committed only once it is archived."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, StorageCommitmentPushModel
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.catalog import commitment as catalog
from service.catalog.tables import CommitmentItem, CommitmentRequest, Instance
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.storage.filesystem import FilesystemStore
from tests.archive_support import c_store, ct_dataset, free_port, part10_bytes, start_serve
from worker.pipeline import WorkerContext, archive_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.840.10008.1.20.1.1"


def _action_information(transaction_uid: str, items: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in items:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return ds


def _outcomes(report: Dataset) -> tuple[set[str], dict[str, int]]:
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])}
    failed = {str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in report.get("FailedSOPSequence", [])}
    return committed, failed


class ReportCatcher:
    """An EVT_N_EVENT_REPORT handler that keeps what it gets and what the archive said then."""

    def __init__(self, archive: Any = None) -> None:
        self.received = threading.Event()
        self.reports: list[tuple[int, Dataset, dict[str, str]]] = []
        self.archive = archive

    def __call__(self, event: Any) -> tuple[int, None]:
        report = event.event_information
        states = {}
        if self.archive is not None:  # the archive's own view at the moment it reported
            for item in report.get("ReferencedSOPSequence", []):
                uid = str(item.ReferencedSOPInstanceUID)
                states[uid] = self.archive.instance(uid)[0]["state"]
        self.reports.append((int(event.request.EventTypeID), report, states))
        self.received.set()
        return 0x0000, None

    def wait(self, limit_seconds: float = 300) -> tuple[int, Dataset, dict[str, str]]:
        assert self.received.wait(limit_seconds), "no N-EVENT-REPORT"
        assert len(self.reports) == 1
        return self.reports[0]


def _requests(database_url: str) -> list[CommitmentRequest]:
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(CommitmentRequest).order_by(CommitmentRequest.id)))
    finally:
        engine.dispose()


def _settled_request(database_url: str, limit_seconds: float = 120) -> CommitmentRequest:
    """The one request, once the archive has recorded the peer's answer to its report."""
    deadline = time.monotonic() + limit_seconds
    while True:
        [request] = _requests(database_url)
        if request.state != "pending" or time.monotonic() > deadline:
            return request
        time.sleep(0.1)


def test_report_on_the_same_association(tmp_path: Path, database_url: str) -> None:
    archive = start_serve(tmp_path, database_url)
    try:
        good = [ct_dataset(seed=60), ct_dataset(seed=61)]
        catcher = ReportCatcher(archive)
        ae = AE(ae_title="COMMITSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CT, [ExplicitVRLittleEndian])
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(
            "127.0.0.1",
            archive.dicom_port,
            ae_title="LVPARCHIVE",
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, catcher)],
        )
        assert assoc.is_established
        try:
            for ds in good:
                assert assoc.send_c_store(ds).Status == 0x0000
            unknown = generate_uid()
            items = [(CT, ds.SOPInstanceUID) for ds in good] + [(CT, unknown), (MRImageStorage, good[0].SOPInstanceUID)]
            # Malformed requests are refused outright
            status, _ = assoc.send_n_action(
                _action_information(generate_uid(), items), 2, StorageCommitmentPushModel, INSTANCE
            )
            assert status.Status == 0x0123
            status, _ = assoc.send_n_action(_action_information("", items), 1, StorageCommitmentPushModel, INSTANCE)
            assert status.Status == 0x0115

            transaction = generate_uid()
            status, _ = assoc.send_n_action(
                _action_information(transaction, items), 1, StorageCommitmentPushModel, INSTANCE
            )
            assert status.Status == 0x0000
            event_type, report, states_then = catcher.wait()
        finally:
            assoc.release()
        assert event_type == 2  # complete, with failures
        assert report.TransactionUID == transaction
        committed, failed = _outcomes(report)
        assert committed == {ds.SOPInstanceUID for ds in good}
        # The first one is committed under CT and conflicts under MR: one UID, two items
        assert [str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence] == [
            good[0].SOPInstanceUID,
            good[1].SOPInstanceUID,
        ]
        assert failed == {unknown: 0x0112, good[0].SOPInstanceUID: 0x0119}
        assert set(states_then.values()) == {"archived"}
        request = _settled_request(database_url)
        assert request.state == "reported" and request.delivered_via == "same-association" and request.event_type == 2
    finally:
        archive.stop()
    assert "Received unexpected" not in archive.log()  # the peer's response was expected, not a stray


def test_report_on_a_new_association_to_the_configured_peer(tmp_path: Path, sqlite_url: str) -> None:
    peer_port = free_port()
    catcher = ReportCatcher()
    listener = AE(ae_title="COMMITSCU")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(
        ("127.0.0.1", peer_port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, catcher)]
    )
    # No embedded worker: nothing can be archived until the test starts one
    archive = start_serve(
        tmp_path,
        sqlite_url,
        embedded_workers=0,
        commitment_peers=f'{{"COMMITSCU": "127.0.0.1:{peer_port}"}}',
    )
    worker = None
    try:
        good, broken = ct_dataset(seed=70), ct_dataset(seed=71)
        ae = AE(ae_title="COMMITSCU")
        ae.add_requested_context(StorageCommitmentPushModel)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assert c_store(archive.dicom_port, [good, broken]) == [0, 0]
        assoc = ae.associate("127.0.0.1", archive.dicom_port, ae_title="LVPARCHIVE")
        transaction = generate_uid()
        items = [(CT, good.SOPInstanceUID), (CT, broken.SOPInstanceUID)]
        status, _ = assoc.send_n_action(
            _action_information(transaction, items), 1, StorageCommitmentPushModel, INSTANCE
        )
        assoc.release()  # the requester does not wait on this association
        assert status.Status == 0x0000

        # The staged copy of one is damaged: its archival fails its SHA-256 check
        engine = create_engine(sqlite_url)
        with Session(engine) as session:
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == broken.SOPInstanceUID)).one()
            staged = archive.data_dir / "store" / (row.staging_key or "")
        staged.write_bytes(staged.read_bytes()[:-2] + b"\x00\x01")
        engine.dispose()
        [request] = _requests(sqlite_url)
        assert request.state == "pending"  # nothing is archived yet, so nothing is reported

        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"], env=archive.env, cwd=tmp_path, stdout=log, stderr=log
        )
        event_type, report, _ = catcher.wait()
        assert event_type == 2 and report.TransactionUID == transaction
        committed, failed = _outcomes(report)
        assert committed == {good.SOPInstanceUID}
        assert failed == {broken.SOPInstanceUID: 0x0110}
        assert [v["state"] for v in archive.instance(broken.SOPInstanceUID)] == ["failed"]
        request = _settled_request(sqlite_url)
        assert request.state == "reported" and request.delivered_via == "new-association"
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        archive.stop()
        server.shutdown()


def test_outcomes_follow_the_catalog_and_the_store(tmp_path: Path, database_url: str) -> None:
    """evaluate() on a real catalog and store: every outcome, the deadline, and giving up."""
    migrate(database_url)
    settings = Settings(data_dir=tmp_path, database_url=database_url, lease_seconds=30)
    factory = make_session_factory(make_engine(database_url))
    store = FilesystemStore(tmp_path / "store")
    ingestor = Ingestor(settings, factory, store, lambda _id: None)
    ctx = WorkerContext(settings, factory, store, "worker")

    def received(seed: int) -> tuple[str, int]:
        ds = ct_dataset(seed=seed)
        path = tmp_path / f"{seed}.dcm"
        path.write_bytes(part10_bytes(ds))
        result = ingestor.ingest_file(path, source="import")
        assert result.instance_id is not None
        return ds.SOPInstanceUID, result.instance_id

    archived, archived_id = received(80)
    assert archive_instance(ctx, archived_id) == "archived"
    lost, lost_id = received(81)
    assert archive_instance(ctx, lost_id) == "archived"
    waiting, _ = received(82)
    with factory() as session:
        store.delete(session.get(Instance, lost_id).object_key)  # type: ignore[union-attr, arg-type]
    unknown = generate_uid()
    items = [(CT, archived), (CT, lost), (CT, waiting), (CT, unknown), (MRImageStorage, archived)]
    with factory() as session:
        pk = catalog.record_request(
            session,
            transaction_uid=generate_uid(),
            calling_ae_title="PACS",
            peer_host=None,
            items=items,
            owner="me",
            lease_seconds=30,
            timeout_seconds=600,
        )
        session.commit()
        assert catalog.due_requests(session, "someone-else") == []  # leased to "me"
        assert catalog.due_requests(session, "me") == [pk]
        evaluation = catalog.evaluate(session, store, pk)
        assert evaluation.pending == 1
        # Past the deadline the waiting one is a failure, and the store is checked
        late = catalog.evaluate(session, store, pk, now=time.time() + 601)
    assert late.pending == 0 and late.event_type == 2
    assert [o.failure_reason for o in late.outcomes] == [None, 0x0110, 0x0110, 0x0112, 0x0119]

    with factory() as session:
        state = catalog.mark_delivery_failed(session, pk, "no route", retry_in_seconds=None)
        assert state == "undeliverable"
        assert catalog.due_requests(session, "me") == []
        catalog.mark_reported(session, pk, late, "same-association")
        reasons = [i.failure_reason for i in session.scalars(select(CommitmentItem).order_by(CommitmentItem.id))]
    assert reasons == [None, 0x0110, 0x0110, 0x0112, 0x0119]
