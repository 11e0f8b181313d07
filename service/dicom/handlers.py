"""Event handlers: plain functions with their dependencies bound (functools.partial), returning
DICOM status codes.  Nothing here raises into pynetdicom: every failure is a status."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from service.ingest import Ingestor, IngestResult, IngestStatus
from service.logs import fields

LOGGER = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNSUPPORTED_TRANSFER_SYNTAX = 0xC001  # within the 0xC000-0xCFFF "cannot understand" range
DUPLICATE_REJECTED = 0xC002
PROCESSING_FAILURE = 0xC211

STATUS_FOR = {
    IngestStatus.STORED: SUCCESS,
    IngestStatus.DUPLICATE_IDENTICAL: SUCCESS,
    IngestStatus.DUPLICATE_DISCARDED: SUCCESS,
    IngestStatus.NEW_VERSION: SUCCESS,
    IngestStatus.TOO_LARGE: OUT_OF_RESOURCES,
    IngestStatus.OUT_OF_RESOURCES: OUT_OF_RESOURCES,
    IngestStatus.INVALID: CANNOT_UNDERSTAND,
    IngestStatus.UNSUPPORTED_SYNTAX: UNSUPPORTED_TRANSFER_SYNTAX,
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


def handle_store(event: Any, ingestor: Ingestor) -> Dataset | int:
    """Chunked receive has already written the object (as sent, with file meta) to a temporary
    file on the data disk; ingest moves it into staging without copying."""
    try:
        path = Path(event.dataset_path)
        expected = str(event.request.AffectedSOPInstanceUID or "") or None
        result = ingestor.ingest_file(path, source="c-store", move=True, expected_sop_instance_uid=expected)
    except Exception:
        LOGGER.exception("C-STORE handler failure", extra=fields(source="c-store"))
        return PROCESSING_FAILURE
    return status_dataset(result)
