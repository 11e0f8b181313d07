"""C-FIND SCP (PS3.4 C.4.1) for the Patient Root and Study Root Query/Retrieve information models,
answered by the query engine that QIDO-RS uses too (service.catalog.query).

A handler in the style of service.dicom.handlers: dependencies bound with functools.partial,
DICOM statuses for every outcome, nothing raised into pynetdicom."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy.orm import Session, sessionmaker

from service.audit import Actor, Auditor
from service.catalog.query import InformationModel, QueryError, query_from_identifier, run_query
from service.logs import fields

LOGGER = logging.getLogger(__name__)

PENDING = 0xFF00
PENDING_UNSUPPORTED_KEYS = 0xFF01  # an optional key was not supported for matching
CANCELLED = 0xFE00
UNABLE_TO_PROCESS = 0xC000
PROCESSING_FAILURE = 0xC001  # within "unable to process": a fault here, not in the request

INFORMATION_MODELS: dict[str, InformationModel] = {
    str(PatientRootQueryRetrieveInformationModelFind): "patient",
    str(StudyRootQueryRetrieveInformationModelFind): "study",
}


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO; reasons name keys and rules, never values
    return ds


def _single_uid(identifier: Dataset, keyword: str) -> str | None:
    value = str(identifier.get(keyword, "") or "")
    return value if value and "\\" not in value and "*" not in value and len(value) <= 64 else None


def _keys_text(identifier: Dataset) -> str:
    """The identifier's keys and values for the audit trail (the catalog, never the log)."""
    parts = []
    for element in identifier:
        try:
            value = "" if element.VR == "SQ" else str(element.value)
        except Exception:
            value = "?"
        parts.append(f"{element.keyword or element.tag}={value}"[:200])
    return "; ".join(parts)[:1500]


def handle_find(event: Any, session_factory: sessionmaker[Session]) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """EVT_C_FIND: one pending response per match, each checked against C-CANCEL first.  The final
    Success is pynetdicom's once this generator ends."""
    started = time.monotonic()
    model = INFORMATION_MODELS.get(str(getattr(event.request, "AffectedSOPClassUID", "")))
    log = {"calling_ae": str(event.assoc.requestor.ae_title).strip(), "model": model}
    if model is None:
        yield _failure(UNABLE_TO_PROCESS, "unsupported information model"), None
        return
    try:
        query = query_from_identifier(event.identifier, model)
    except QueryError as exc:
        LOGGER.warning("C-FIND refused", extra=fields(**log, status=hex(exc.status), reason=exc.reason))
        yield _failure(exc.status, exc.reason), None
        return
    except Exception:  # an identifier pydicom cannot decode at all
        LOGGER.warning("C-FIND refused: undecodable identifier", extra=fields(**log), exc_info=True)
        yield _failure(UNABLE_TO_PROCESS, "undecodable identifier"), None
        return
    log["query_level"] = query.level.name.lower()
    Auditor(session_factory).record(
        Actor.dicom(event.assoc),
        "query",
        "c-find",
        study=_single_uid(event.identifier, "StudyInstanceUID"),
        detail=f"{model} root, {query.level.name}: {_keys_text(event.identifier)}",
    )
    pending = PENDING_UNSUPPORTED_KEYS if query.unsupported_matching else PENDING
    retrieve_ae = str(event.assoc.ae.ae_title).strip()
    matches = 0
    try:
        with session_factory() as session:
            for ds in run_query(session, query):
                if event.is_cancelled:
                    LOGGER.info("C-FIND cancelled", extra=fields(**log, matches=matches))
                    yield CANCELLED, None
                    return
                ds.RetrieveAETitle = retrieve_ae
                matches += 1
                yield pending, ds
    except Exception:
        LOGGER.exception("C-FIND failed", extra=fields(**log, matches=matches))
        yield _failure(PROCESSING_FAILURE, "query failed"), None
        return
    LOGGER.info(
        "C-FIND",
        extra=fields(
            **log,
            keys=len(query.matches),
            matches=matches,
            ms=round((time.monotonic() - started) * 1000, 1),
        ),
    )
