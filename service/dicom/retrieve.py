"""C-MOVE and C-GET SCP handlers: the matching instances, rebuilt and SHA-256 checked, sent as
C-STORE sub-operations.  The original bytes go out in their own transfer syntax when the peer
accepted it; otherwise they are decompressed to Explicit (or Implicit) VR Little Endian, pixel
checked.  An instance that fails verification is a failed sub-operation, never sent."""

from __future__ import annotations

import concurrent.futures
import io
import logging
import threading
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.audit import Actor, Auditor
from service.catalog.query import QueryError, matching_instances, query_from_identifier
from service.logs import fields
from service.retrieve import InstanceRef, RetrieveError, Retriever, refs_by_id
from service.transcode import TranscodeError, transcode

LOGGER = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
UNABLE_TO_PROCESS = 0xC000
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255
# A UID under 2.25 (UUID-derived) no peer proposes and the archive never offers
NEVER_NEGOTIATED = f"2.25.{uuid.uuid4().int}"
PATIENT_ROOT = ("1.2.840.10008.5.1.4.1.2.1.2", "1.2.840.10008.5.1.4.1.2.1.3")  # MOVE, GET


class NoAcceptedContext(Exception):
    pass


def _model(event: Any) -> str:
    return "patient" if str(event.context.abstract_syntax) in PATIENT_ROOT else "study"


def _refs(session_factory: sessionmaker[Session], identifier: Dataset, model: str) -> list[InstanceRef]:
    query = query_from_identifier(identifier, model)  # type: ignore[arg-type]
    with session_factory() as session:
        return refs_by_id(session, [row.id for row in matching_instances(session, query)])


def _query(session_factory: sessionmaker[Session], event: Any, interface: str) -> list[InstanceRef]:
    try:
        return _refs(session_factory, event.identifier, _model(event))
    except QueryError as exc:
        LOGGER.warning(f"{interface} identifier refused", extra=fields(reason=str(exc)))
        raise
    except Exception as exc:
        LOGGER.warning(f"{interface} identifier not processed", extra=fields(error=type(exc).__name__))
        raise


def _accepted(contexts: list[Any], sop_class: str) -> set[str]:
    """Syntaxes of the accepted contexts in which the archive may send C-STORE requests (it is the
    Storage SCU both on a C-MOVE sub-association and, by role selection, on a C-GET association)."""
    return {str(cx.transfer_syntax[0]) for cx in contexts if str(cx.abstract_syntax) == sop_class and cx.as_scu}


def dataset_for(retriever: Retriever, ref: InstanceRef, accepted: set[str]) -> Dataset:
    """The verified instance as a Dataset in the best syntax the peer accepted for its SOP class."""
    for syntax in (ref.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if syntax in accepted:
            target = syntax
            break
    else:
        raise NoAcceptedContext(f"peer accepted no context for SOP class {ref.sop_class_uid} we can send")
    data = retriever.fetch(ref)
    out = transcode(data, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(out.data))


def _sub_operations(
    retriever: Retriever, refs: list[InstanceRef], accepted_for: Any, event: Any, interface: str
) -> Iterator[tuple[int, Dataset | None]]:
    """(status, dataset) yields for pynetdicom, the next instance prepared while one is sent.  Each
    instance is audited (sent or not) as the requesting AE's retrieval."""
    auditor = Auditor(retriever.session_factory)
    actor = Actor.dicom(event.assoc)
    destination = str(getattr(event, "move_destination", "") or "").strip()

    def audit(ref: InstanceRef, outcome: str, detail: str) -> None:
        what = {"study": ref.study_instance_uid, "series": ref.series_instance_uid, "sop": ref.sop_instance_uid}
        auditor.record(actor, "retrieve", interface, outcome, detail=detail, **what)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{interface}-prefetch")

    def prepare(ref: InstanceRef) -> Dataset:
        return dataset_for(retriever, ref, accepted_for(ref.sop_class_uid))

    try:
        pending = pool.submit(prepare, refs[0]) if refs else None
        for index, ref in enumerate(refs):
            if event.is_cancelled:
                LOGGER.info("retrieve cancelled", extra=fields(interface=interface, sent=index, of=len(refs)))
                yield CANCEL, None
                return
            assert pending is not None
            try:
                dataset = pending.result()
            except (RetrieveError, TranscodeError, NoAcceptedContext) as exc:
                dataset = None
                problem: Exception | None = exc
            else:
                problem = None
            pending = pool.submit(prepare, refs[index + 1]) if index + 1 < len(refs) else None
            if dataset is None:
                metrics.RETRIEVALS.labels(interface=interface, outcome=type(problem).__name__).inc()
                LOGGER.warning(
                    "sub-operation not sent", extra=fields(interface=interface, instance=ref.id, reason=str(problem))
                )
                audit(ref, "failed", str(problem)[:500])
                yield PENDING, _unsendable(ref)
                continue
            metrics.RETRIEVALS.labels(interface=interface, outcome="ok").inc()
            audit(ref, "ok", (f"to {destination} " if destination else "") + str(dataset.file_meta.TransferSyntaxUID))
            yield PENDING, dataset
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _unsendable(ref: InstanceRef) -> Dataset:
    """A stand-in pynetdicom cannot send: no presentation context exists for its SOP class, so the
    C-STORE fails before a byte goes out.  That is how a handler makes pynetdicom count one failed
    sub-operation (and list its SOP Instance UID in the final response) and carry on with the rest."""
    stand_in = Dataset()
    stand_in.SOPClassUID = NEVER_NEGOTIATED
    stand_in.SOPInstanceUID = ref.sop_instance_uid
    return stand_in


def _contexts(refs: list[InstanceRef]) -> list[Any]:
    """One context per (SOP class, stored syntax), so originals go unchanged, and per SOP class one
    offering Explicit/Implicit VR Little Endian for the peer that refuses the stored syntax."""
    stored = sorted({(ref.sop_class_uid, ref.transfer_syntax_uid) for ref in refs})
    classes = sorted({sop_class for sop_class, _ in stored})
    contexts = [build_context(c, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for c in classes]
    for sop_class, syntax in stored:
        if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and len(contexts) < MAX_CONTEXTS:
            contexts.append(build_context(sop_class, [syntax]))
    return contexts[:MAX_CONTEXTS]


def handle_move(
    event: Any,
    *,
    retriever: Retriever,
    session_factory: sessionmaker[Session],
    peers: dict[str, tuple[str, int]],
) -> Iterator[Any]:
    destination = str(event.move_destination).strip()
    if destination not in peers:
        LOGGER.warning("C-MOVE to unknown destination", extra=fields(destination=destination))
        yield None, None
        return
    # A bad identifier fails before any association is opened: pynetdicom answers an exception at
    # this point with 0xC514 (Failure, unable to process), without sending anything
    refs = _query(session_factory, event, "C-MOVE")
    host, port = peers[destination]
    sub_association: dict[str, Any] = {}
    ready = threading.Event()

    def on_accepted(accepted_event: Any) -> None:
        sub_association["assoc"] = accepted_event.assoc
        ready.set()

    options = {"contexts": _contexts(refs), "evt_handlers": [(evt.EVT_ACCEPTED, on_accepted)]}
    yield host, port, options  # with no match, pynetdicom answers Success before associating
    LOGGER.info("C-MOVE", extra=fields(destination=destination, instances=len(refs)))
    yield len(refs)

    def accepted_for(sop_class: str) -> set[str]:
        ready.wait(30)
        assoc = sub_association.get("assoc")
        return _accepted(assoc.accepted_contexts, sop_class) if assoc is not None else set()

    yield from _sub_operations(retriever, refs, accepted_for, event, "c-move")


def handle_get(event: Any, *, retriever: Retriever, session_factory: sessionmaker[Session]) -> Iterator[Any]:
    refs = _query(session_factory, event, "C-GET")
    LOGGER.info("C-GET", extra=fields(instances=len(refs)))
    yield len(refs)
    contexts = event.assoc.accepted_contexts

    def accepted_for(sop_class: str) -> set[str]:
        return _accepted(contexts, sop_class)

    yield from _sub_operations(retriever, refs, accepted_for, event, "c-get")
