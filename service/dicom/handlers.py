"""Event handlers: plain functions with their dependencies bound (functools.partial), returning
DICOM status codes.  Nothing here raises into pynetdicom: every failure is a status."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from service.audit import Actor, Auditor
from service.dicom.commitment import STORAGE_COMMITMENT_INSTANCE, CommitmentReporter
from service.dicomfile import is_valid_uid, known_transfer_syntax
from service.ingest import Ingestor, IngestResult, IngestStatus
from service.logs import fields
from service.security import AllowList

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNSUPPORTED_TRANSFER_SYNTAX = 0xC001  # within the 0xC000-0xCFFF "cannot understand" range
DUPLICATE_REJECTED = 0xC002
PROCESSING_FAILURE = 0xC211
NOT_AUTHORIZED = 0x0124  # PS3.4 Table B.2-1 "Refused: Not Authorized"

STATUS_FOR = {
    IngestStatus.STORED: SUCCESS,
    IngestStatus.DUPLICATE_IDENTICAL: SUCCESS,
    IngestStatus.DUPLICATE_DISCARDED: SUCCESS,
    IngestStatus.NEW_VERSION: SUCCESS,
    IngestStatus.TOO_LARGE: OUT_OF_RESOURCES,
    IngestStatus.OUT_OF_RESOURCES: OUT_OF_RESOURCES,
    IngestStatus.INVALID: CANNOT_UNDERSTAND,
    IngestStatus.UNSUPPORTED_SYNTAX: UNSUPPORTED_TRANSFER_SYNTAX,
    IngestStatus.SOP_CLASS_MISMATCH: DATASET_DOES_NOT_MATCH_SOP_CLASS,
    IngestStatus.DUPLICATE_REJECTED: DUPLICATE_REJECTED,
}


def status_dataset(result: IngestResult) -> Dataset:
    status = Dataset()
    status.Status = STATUS_FOR[result.status]
    if result.reason:
        # ErrorComment is LO: 64 characters; the reasons never quote dataset values
        status.ErrorComment = result.reason[:64]
    return status


def handle_echo(event: Any) -> int:
    return SUCCESS


# ------------------------------------------------------------------------------ negotiation

EXPLICIT_VR_LE = UID("1.2.840.10008.1.2.1")
IMPLICIT_VR_LE = UID("1.2.840.10008.1.2")


def preferred_transfer_syntaxes(proposed: list[UID]) -> list[UID]:
    """A presentation context's proposed transfer syntaxes, in the order the archive takes them:
    the sender's order, except that Explicit VR LE goes ahead of Implicit VR LE (same pixels, but
    Implicit loses the VRs of private and unknown elements for good) and syntaxes nobody here can
    read are dropped while others remain.  Compressed syntaxes keep the sender's place: a sender
    that puts one first holds the data that way, and taking it as is spares a transcode."""
    known = [syntax for syntax in proposed if known_transfer_syntax(syntax)] or list(proposed)
    if EXPLICIT_VR_LE in known and IMPLICIT_VR_LE in known:
        explicit, implicit = known.index(EXPLICIT_VR_LE), known.index(IMPLICIT_VR_LE)
        if implicit < explicit:
            known.insert(implicit, known.pop(explicit))
    return known


def handle_requested(
    event: Any,
    store_allowed: AllowList | None = None,
    qr_allowed: AllowList | None = None,
    auditor: Auditor | None = None,
) -> None:
    """EVT_REQUESTED, before negotiation.  pynetdicom's unrestricted storage negotiation (the only
    way to accept every storage SOP class, private ones included, and serve them all with the
    Storage service) accepts the first proposed transfer syntax of each context and ignores the
    SCP's supported contexts for storage classes; so the preference is applied by putting the
    preferred syntax first in the proposal.  This is exact per presentation context, which
    per-abstract-syntax supported contexts would not be when one SOP class comes in several."""
    primitive = event.assoc.requestor.primitive
    for context in primitive.presentation_context_definition_list:
        proposed = list(context.transfer_syntax)
        preferred = preferred_transfer_syntaxes(proposed)
        if preferred != proposed:
            context.transfer_syntax = preferred
    if store_allowed is not None and qr_allowed is not None:
        _apply_allow_lists(event, store_allowed, qr_allowed, auditor)


# Query/retrieve information models (FIND, MOVE, GET; Patient and Study Root) and Storage Commitment
QUERY_RETRIEVE = {
    "1.2.840.10008.5.1.4.1.2.1.1",
    "1.2.840.10008.5.1.4.1.2.1.2",
    "1.2.840.10008.5.1.4.1.2.1.3",
    "1.2.840.10008.5.1.4.1.2.2.1",
    "1.2.840.10008.5.1.4.1.2.2.2",
    "1.2.840.10008.5.1.4.1.2.2.3",
}
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
VERIFICATION = "1.2.840.10008.1.1"
# A non-storage SOP class pynetdicom knows and the archive does not support (Procedural Event
# Logging): a context given this abstract syntax is answered "abstract syntax not supported"
# (PS3.8 result 3).  The accept PDU names contexts by ID only, so the requestor sees its own context
# refused.  (pynetdicom treats classes it has no name for as storage under unrestricted storage.)
REFUSED_ABSTRACT_SYNTAX = "1.2.840.10008.1.40"
REJECT_PERMANENT, REJECT_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03


def _calling(event: Any) -> tuple[str, str]:
    primitive = event.assoc.requestor.primitive
    return str(primitive.calling_ae_title).strip(), str(event.assoc.requestor.address)


def _apply_allow_lists(event: Any, store_allowed: AllowList, qr_allowed: AllowList, auditor: Auditor | None) -> None:
    """Reject AEs on neither list at association; refuse the contexts of the service an AE may not
    use (storage without an SCP role, which C-GET needs, counts as storing)."""
    title, host = _calling(event)
    may_store, may_query = store_allowed.allows(title, host), qr_allowed.allows(title, host)
    if not may_store and not may_query:
        LOGGER.warning("association rejected: calling AE not allowed", extra=fields(calling_ae=title, host=host))
        if auditor is not None:
            auditor.record(Actor(title, "dicom-ae", host), "associate", "dicom", "refused", detail="AE not allowed")
        event.assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()  # as pynetdicom does after its own rejections: the DUL sends the PDU first
        return
    primitive = event.assoc.requestor.primitive
    receives = {  # SOP classes the requestor offers to receive (SCP role): C-GET sub-operations
        str(item.sop_class_uid)
        for item in (primitive.user_information or [])
        if type(item).__name__ == "SCP_SCU_RoleSelectionNegotiation" and item.scp_role
    }
    for context in primitive.presentation_context_definition_list:
        syntax = str(context.abstract_syntax)
        if syntax == VERIFICATION:
            continue
        if syntax in QUERY_RETRIEVE:
            allowed = may_query
        elif syntax == STORAGE_COMMITMENT:
            allowed = may_store
        else:
            allowed = may_store or (may_query and syntax in receives)
        if not allowed:
            context.abstract_syntax = REFUSED_ABSTRACT_SYNTAX


# ------------------------------------------------------------------------------ size limit


class DiscardedDataSet:
    """Takes the place of pynetdicom's temporary file once a C-STORE data set grows past the size
    limit: the rest of the P-DATA is counted and dropped (the peer sends it all before it can read
    a response), and the C-STORE handler answers 0xA700 without reading anything."""

    def __init__(self, name: str, spooled: int) -> None:
        self.name = name  # pynetdicom unlinks this after the handler: already gone, which it tolerates
        self.spooled = spooled  # bytes that reached the disk (and were deleted) before the limit
        self.received = spooled

    def write(self, data: bytes) -> int:
        self.received += len(data)
        return len(data)

    @property
    def file(self) -> DiscardedDataSet:  # pynetdicom calls `.file.flush()` after each fragment
        return self

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.received

    def close(self) -> None:
        pass


def guard_data_set_size(event: Any, limit: int) -> None:
    """EVT_PDU_RECV, in the DUL thread, before the P-DATA goes to the DIMSE decoder that appends it
    to the temporary file.  pynetdicom offers no public hook into chunked receive; this uses the
    decoder's in-progress message (`dimse.message`, `_data_set_file`, `_data_set_path`; pinned
    pynetdicom 3.0.4).  The file never grows past the limit: the PDU that would cross it is the
    first one dropped.  (A data set that shares its first PDU with the command set is checked by
    the ingest size check instead; that PDU is at most MAX_PDU_BYTES.)"""
    items = getattr(event.pdu, "presentation_data_value_items", None)
    if not items:
        return
    message = getattr(event.assoc.dimse, "message", None)
    spool = getattr(message, "_data_set_file", None)
    if spool is None or isinstance(spool, DiscardedDataSet):
        return
    # Data set fragments: message control header bit 0 clear; the header byte itself is not stored
    incoming = sum(len(item.data) - 1 for item in items if item.data and not item.data[0] & 1)
    spooled = spool.tell()
    if spooled + incoming <= limit:
        return
    path = str(message._data_set_path)  # type: ignore[union-attr]
    spool.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
    message._data_set_file = DiscardedDataSet(path, spooled)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ C-STORE


def handle_store(event: Any, ingestor: Ingestor, store_allowed: AllowList | None = None) -> Dataset | int:
    """Chunked receive has already written the object (as sent, with file meta) to a temporary
    file on the data disk; ingest moves it into staging without copying."""
    if store_allowed is not None and not store_allowed.allows(*_calling(event)):
        # A context kept for C-GET sub-operations used to send instead
        return NOT_AUTHORIZED
    spool = getattr(event.request, "_dataset_file", None)
    if isinstance(spool, DiscardedDataSet):
        result = ingestor.refuse_too_large("c-store", spool.received, spooled=spool.spooled)
        return status_dataset(result)
    try:
        path = Path(event.dataset_path)
        expected = str(event.request.AffectedSOPInstanceUID or "") or None
        result = ingestor.ingest_file(
            path, source="c-store", move=True, expected_sop_instance_uid=expected, actor=Actor.dicom(event.assoc)
        )
    except Exception:
        LOGGER.exception("C-STORE handler failure", extra=fields(source="c-store"))
        return PROCESSING_FAILURE
    return status_dataset(result)


# ------------------------------------------------------------------------------ Storage Commitment

# N-ACTION statuses (PS3.4 J.3.2.1.1 / PS3.7 C)
NO_SUCH_ACTION = 0x0123
INVALID_OBJECT_INSTANCE = 0x0117
INVALID_ARGUMENT_VALUE = 0x0115
RESOURCE_LIMITATION = 0x0213
N_PROCESSING_FAILURE = 0x0110
MAX_COMMITMENT_ITEMS = 100_000


def _commitment_items(info: Dataset) -> tuple[str, list[tuple[str, str]]] | None:
    transaction_uid = str(info.get("TransactionUID", "") or "").strip()
    if not is_valid_uid(transaction_uid):
        return None
    items = []
    for item in info.get("ReferencedSOPSequence", None) or []:
        sop_class = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        sop_instance = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        # A malformed instance UID is kept: it will be reported as "no such object instance"
        if not sop_class or not sop_instance or len(sop_class) > 64 or len(sop_instance) > 64:
            return None
        items.append((sop_class, sop_instance))
    return (transaction_uid, items) if items else None


def handle_commitment_action(event: Any, reporter: CommitmentReporter) -> tuple[int, Dataset | None]:
    """N-ACTION (Request Storage Commitment): the request is recorded before Success goes out; the
    N-EVENT-REPORT follows once every item is archived, failed or timed out."""
    request = event.request
    if request.ActionTypeID != 1:
        return NO_SUCH_ACTION, None
    if str(request.RequestedSOPInstanceUID) != STORAGE_COMMITMENT_INSTANCE:
        return INVALID_OBJECT_INSTANCE, None
    try:
        parsed = _commitment_items(event.action_information)
    except Exception:  # undecodable Action Information
        parsed = None
    if parsed is None:
        LOGGER.warning("storage commitment refused: malformed request", extra=fields(source="n-action"))
        return INVALID_ARGUMENT_VALUE, None
    transaction_uid, items = parsed
    if len(items) > MAX_COMMITMENT_ITEMS:
        return RESOURCE_LIMITATION, None
    requestor = event.assoc.requestor
    try:
        reporter.accept(
            transaction_uid=transaction_uid,
            calling_ae_title=str(requestor.ae_title).strip(),
            peer_host=str(requestor.address)[:64] if requestor.address else None,
            items=items,
            assoc=event.assoc,
        )
    except Exception:
        LOGGER.exception("storage commitment request not recorded", extra=fields(source="n-action"))
        return N_PROCESSING_FAILURE, None
    return SUCCESS, None
