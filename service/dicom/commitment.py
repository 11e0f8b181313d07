"""Storage Commitment Push Model SCP: the reporter thread that answers N-ACTIONs with
N-EVENT-REPORTs once every item is settled.

Delivery, in order: the association the N-ACTION came on, if it is still open (PS3.4 J.3.3.1.2
allows it; the peer may release at any time); else a new association to the peer configured for
the requester's AE title (`ARCHIVE_COMMITMENT_PEERS`), the archive proposing the SCP role.

Sending on an association that pynetdicom's reactor serves is done the way pynetdicom's own
`send_*` methods do it (pause the reactor at its checkpoint, send), with two differences that
remove races with the peer's own requests: the send happens only when the association is idle
(every request answered, nothing half received, quiet for a moment), and the response is not
taken off the DIMSE queue by this thread (where it could be confused with the peer's next
request) but observed in EVT_DIMSE_RECV; the reactor then drops it as an unexpected response.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy.orm import Session, sessionmaker

from service.catalog import commitment as catalog
from service.catalog.tables import CommitmentRequest, CommitmentState
from service.config import Settings
from service.logs import fields
from service.storage.base import ObjectStore

LOGGER = logging.getLogger(__name__)

# The well-known SOP Instance of the Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
QUIET_SECONDS = 0.2
PAUSE_LIMIT_SECONDS = 5.0
RESPONSE_LIMIT_SECONDS = 60.0


class Busy(Exception):
    """The association is serving a request right now: try again at the next poll."""


class DeliveryFailed(Exception):
    pass


class ExpectedReportResponses(logging.Filter):
    """The reactor logs our N-EVENT-REPORT responses as unexpected (it never sent the requests
    itself); they are expected here and already read in EVT_DIMSE_RECV."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Received unexpected N-EVENT-REPORT")


# ------------------------------------------------------------------------------ association activity


@dataclass
class Activity:
    """What one association is doing, as the DIMSE events tell it."""

    requests_received: int = 0
    responses_sent: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    next_message_id: int = 1
    awaited: dict[int, tuple[threading.Event, list[int]]] = field(default_factory=dict)

    def idle(self, assoc: Any) -> bool:
        return (
            self.requests_received == self.responses_sent
            and getattr(assoc.dimse, "message", None) is None  # nothing half received
            and assoc.dimse.msg_queue.empty()
            and time.monotonic() - self.last_activity >= QUIET_SECONDS
        )


class ActivityTracker:
    """Bound to EVT_PDU_RECV, EVT_DIMSE_RECV and EVT_DIMSE_SENT of the SCP's associations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_assoc: weakref.WeakKeyDictionary[Any, Activity] = weakref.WeakKeyDictionary()

    def get(self, assoc: Any) -> Activity:
        with self._lock:
            activity = self._by_assoc.get(assoc)
            if activity is None:
                activity = self._by_assoc[assoc] = Activity()
            return activity

    def on_pdu_received(self, event: Any) -> None:
        self.get(event.assoc).last_activity = time.monotonic()

    def on_dimse_received(self, event: Any) -> None:
        activity = self.get(event.assoc)
        activity.last_activity = time.monotonic()
        name = type(event.message).__name__
        if name.endswith("_RQ") and name != "C_CANCEL_RQ":  # C-CANCEL gets no response
            activity.requests_received += 1
        elif name == "N_EVENT_REPORT_RSP":
            command = event.message.command_set
            waiter = activity.awaited.pop(int(command.MessageIDBeingRespondedTo), None)
            if waiter is not None:
                waiter[1].append(int(command.Status))
                waiter[0].set()

    def on_dimse_sent(self, event: Any) -> None:
        activity = self.get(event.assoc)
        activity.last_activity = time.monotonic()
        if type(event.message).__name__.endswith("_RSP"):
            activity.responses_sent += 1


# ------------------------------------------------------------------------------ the report


def event_information(evaluation: catalog.Evaluation, retrieve_ae_title: str) -> Dataset:
    """PS3.4 Table J.3-2: Transaction UID, Referenced SOP Sequence (committed) and Failed SOP
    Sequence (with Failure Reason)."""
    ds = Dataset()
    ds.TransactionUID = evaluation.transaction_uid
    committed, failed = [], []
    for outcome in evaluation.outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = outcome.sop_class_uid
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.failure_reason is None:
            committed.append(item)
        else:
            item.FailureReason = outcome.failure_reason
            failed.append(item)
    if committed:
        ds.RetrieveAETitle = retrieve_ae_title
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def send_on_open_association(assoc: Any, activity: Activity, ds: Dataset, event_type: int) -> int:
    """Send the N-EVENT-REPORT on the association the N-ACTION came on; returns the peer's status.
    Raises Busy (try later) or DeliveryFailed."""
    if not assoc.is_established:
        raise DeliveryFailed("association no longer open")
    if not activity.idle(assoc):
        raise Busy()
    try:
        context = assoc._get_valid_context(StorageCommitmentPushModel, "", None)
    except ValueError as exc:
        raise DeliveryFailed("no Storage Commitment presentation context on the association") from exc
    syntax = context.transfer_syntax[0]
    request = N_EVENT_REPORT()
    request.MessageID = activity.next_message_id
    activity.next_message_id = activity.next_message_id % 65535 + 1
    request.AffectedSOPClassUID = StorageCommitmentPushModel
    request.AffectedSOPInstanceUID = STORAGE_COMMITMENT_INSTANCE
    request.EventTypeID = event_type
    encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if encoded is None:
        raise DeliveryFailed("event information could not be encoded")
    request.EventInformation = BytesIO(encoded)
    answered, status = threading.Event(), list[int]()
    # Park the reactor at its checkpoint so it dispatches nothing while the request goes out
    assoc._reactor_checkpoint.clear()
    try:
        limit = time.monotonic() + PAUSE_LIMIT_SECONDS
        while not assoc._is_paused:
            if time.monotonic() > limit or not assoc.is_established:
                raise Busy()
            time.sleep(0.001)
        # _is_paused is also set while a handler runs: only an idle association is ours to use
        if not activity.idle(assoc):
            raise Busy()
        activity.awaited[request.MessageID] = (answered, status)
        assoc.dimse.send_msg(request, context.context_id)
    finally:
        assoc._reactor_checkpoint.set()
    if not answered.wait(RESPONSE_LIMIT_SECONDS) or not status:
        activity.awaited.pop(request.MessageID, None)
        raise DeliveryFailed("no N-EVENT-REPORT response on the open association")
    return status[0]


def send_on_new_association(
    settings: Settings, called_ae_title: str, address: str, ds: Dataset, event_type: int
) -> int:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeliveryFailed(f"commitment peer address {address!r} is not host:port")
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    # The archive requests the association but is the SOP class's SCP: propose that role
    role = build_role(StorageCommitmentPushModel, scp_role=True)
    assoc = ae.associate(host, int(port), ae_title=called_ae_title, ext_neg=[role])
    if not assoc.is_established:
        raise DeliveryFailed(f"association to {address} not established")
    try:
        status, _reply = assoc.send_n_event_report(
            ds, event_type, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise DeliveryFailed("no N-EVENT-REPORT response on the new association")
    return int(status.Status)


# ------------------------------------------------------------------------------ the reporter


class CommitmentReporter(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        tracker: ActivityTracker,
    ) -> None:
        super().__init__(name="commitment-reporter", daemon=True)
        self.settings, self.session_factory, self.store, self.tracker = settings, session_factory, store, tracker
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._associations: dict[int, Any] = {}  # request pk -> the association it came on

    def accept(
        self,
        *,
        transaction_uid: str,
        calling_ae_title: str,
        peer_host: str | None,
        items: list[tuple[str, str]],
        assoc: Any,
    ) -> int:
        """Record an N-ACTION (durably, before its Success goes out) and remember its association."""
        with self.session_factory() as session:
            request_pk = catalog.record_request(
                session,
                transaction_uid=transaction_uid,
                calling_ae_title=calling_ae_title,
                peer_host=peer_host,
                items=items,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                timeout_seconds=self.settings.commitment_timeout_seconds,
            )
            session.commit()
        with self._lock:
            self._associations[request_pk] = assoc
        LOGGER.info("storage commitment requested", extra=fields(request=request_pk, items=len(items)))
        return request_pk

    def run(self) -> None:
        while not self.stopping.wait(self.settings.commitment_poll_seconds):
            try:
                self.poll()
            except Exception:
                LOGGER.warning("commitment poll failed", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()

    def poll(self) -> int:
        """Report every due request whose items are all settled; returns how many were reported."""
        with self.session_factory() as session:
            due = catalog.due_requests(session, self.owner)
        reported = 0
        for request_pk in due:
            if self.stopping.is_set():
                break
            try:
                reported += self._process(request_pk)
            except Exception:
                LOGGER.warning("commitment report failed", extra=fields(request=request_pk), exc_info=True)
        return reported

    def _process(self, request_pk: int) -> int:
        with self.session_factory() as session:
            if not catalog.claim(session, request_pk, self.owner, self.settings.lease_seconds):
                return 0
            evaluation = catalog.evaluate(session, self.store, request_pk)
        if evaluation.pending:
            return 0
        ds = event_information(evaluation, self.settings.ae_title)
        try:
            via, status = self._deliver(request_pk, evaluation, ds)
        except Busy:
            return 0
        except DeliveryFailed as exc:
            return self._failed(request_pk, evaluation, str(exc))
        if status != 0x0000:
            return self._failed(request_pk, evaluation, f"peer answered status 0x{status:04X}")
        with self.session_factory() as session:
            catalog.mark_reported(session, request_pk, evaluation, via)
        with self._lock:
            self._associations.pop(request_pk, None)
        failed = sum(o.failure_reason is not None for o in evaluation.outcomes)
        LOGGER.info(
            "storage commitment reported",
            extra=fields(request=request_pk, via=via, committed=len(evaluation.outcomes) - failed, failed=failed),
        )
        return 1

    def _deliver(self, request_pk: int, evaluation: catalog.Evaluation, ds: Dataset) -> tuple[str, int]:
        with self._lock:
            assoc = self._associations.get(request_pk)
        if assoc is not None and assoc.is_established:
            try:
                return "same-association", send_on_open_association(
                    assoc, self.tracker.get(assoc), ds, evaluation.event_type
                )
            except DeliveryFailed:
                LOGGER.info("open association unusable; trying a new one", extra=fields(request=request_pk))
        address = self.settings.commitment_peers.get(evaluation.calling_ae_title)
        if address is None:
            raise DeliveryFailed("association closed and no commitment peer configured for the requester")
        return "new-association", send_on_new_association(
            self.settings, evaluation.calling_ae_title, address, ds, evaluation.event_type
        )

    def _failed(self, request_pk: int, evaluation: catalog.Evaluation, error: str) -> int:
        routable = evaluation.calling_ae_title in self.settings.commitment_peers
        with self.session_factory() as session:
            request = session.get(CommitmentRequest, request_pk)
            attempts = request.attempts if request is not None else 0
            retry = min(300.0, 5.0 * 2**attempts) if routable else None
            state = catalog.mark_delivery_failed(session, request_pk, error, retry_in_seconds=retry)
        LOGGER.warning(
            "storage commitment not delivered", extra=fields(request=request_pk, state=str(state), error=error)
        )
        if state != CommitmentState.PENDING:
            with self._lock:
                self._associations.pop(request_pk, None)
        return 0
