"""STOW-RS (PS3.18 10.5): POST /dicomweb/studies[/{study}] with multipart/related; type=application/dicom."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, actor_of, require
from service.api.multipart import MultipartError, MultipartRelatedParser, Part, PartTooLarge
from service.audit import Actor
from service.dicomfile import is_valid_uid
from service.ingest import BACKPRESSURE_REASON, STUDY_MISMATCH_REASON, IngestResult, IngestStatus
from service.logs import fields
from service.security import Role

LOGGER = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(require(Role.UPLOADER))])
DICOM_JSON = "application/dicom+json"

# PS3.18 Table 10.5.3-2 failure reasons (and PS3.4 C-STORE statuses they borrow)
FAILURE_REASON = {
    IngestStatus.TOO_LARGE: 0xA700,
    IngestStatus.OUT_OF_RESOURCES: 0xA700,
    IngestStatus.INVALID: 0xC000,
    IngestStatus.UNSUPPORTED_SYNTAX: 0xC000,
    IngestStatus.SOP_CLASS_MISMATCH: 0xA900,  # the part's file meta names another SOP class
    IngestStatus.DUPLICATE_REJECTED: 0x0111,  # duplicate SOP instance
}
STUDY_MISMATCH = 0xA900
PROCESSING_FAILURE = 0x0110


def _parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    media, *params = [p.strip() for p in value.split(";")]
    parsed = {}
    for param in params:
        name, _, raw = param.partition("=")
        parsed[name.strip().lower()] = raw.strip().strip('"')
    return media.lower(), parsed


def _uid_element(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]}


def _referenced_item(result: IngestResult, base_url: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item["00081150"] = _uid_element(result.sop_class_uid)
    if result.sop_instance_uid:
        item["00081155"] = _uid_element(result.sop_instance_uid)
        # Quoted: a UID may hold spaces (accepted as sent, see service.dicomfile.UID_PATTERN)
        item["00081190"] = {"vr": "UR", "Value": [f"{base_url}instances/{quote(result.sop_instance_uid)}"]}
    return item


def _failed_item(result: IngestResult | None, reason: int) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result is not None and result.sop_class_uid:
        item["00081150"] = _uid_element(result.sop_class_uid)
    if result is not None and result.sop_instance_uid:
        item["00081155"] = _uid_element(result.sop_instance_uid)
    item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


async def _receive(request: Request, parser: MultipartRelatedParser) -> None:
    async for chunk in request.stream():
        parser.feed(chunk)


@router.post("/studies")
async def stow(request: Request, runtime: RuntimeDep) -> Response:
    return await _stow(request, runtime, None)


@router.post("/studies/{study_instance_uid}")
async def stow_study(study_instance_uid: str, request: Request, runtime: RuntimeDep) -> Response:
    if not is_valid_uid(study_instance_uid):
        return JSONResponse({"error": "malformed Study Instance UID"}, status_code=400)
    return await _stow(request, runtime, study_instance_uid)


async def _stow(request: Request, runtime: Any, study_uid: str | None) -> Response:
    media, params = _parse_content_type(request.headers.get("content-type", ""))
    part_type = params.get("type", "application/dicom").lower()
    if media != "multipart/related" or part_type != "application/dicom" or not params.get("boundary"):
        return JSONResponse(
            {"error": 'expected multipart/related; type="application/dicom" with a boundary'}, status_code=415
        )
    settings = runtime.settings
    declared = request.headers.get("content-length")
    # One instance per request is the common case: refuse it before reading a byte
    if declared and declared.isdigit() and int(declared) > settings.max_instance_bytes + 64 * 1024 * 1024:
        LOGGER.warning("STOW refused: body larger than the limit", extra=fields(bytes=int(declared)))
        return JSONResponse({"error": "request larger than the instance size limit"}, status_code=413)
    parser = MultipartRelatedParser(
        params["boundary"].encode("latin-1"), settings.incoming_dir, settings.max_instance_bytes
    )
    try:
        await _receive(request, parser)
        parts = parser.close()
    except PartTooLarge:
        parser.discard()
        LOGGER.warning("STOW refused: part larger than the limit", extra=fields(source="stow"))
        return JSONResponse({"error": "instance larger than the size limit"}, status_code=413)
    except MultipartError as exc:
        parser.discard()
        return JSONResponse({"error": str(exc)}, status_code=400)
    except BaseException:
        parser.discard()
        raise

    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    busy: list[IngestResult] = []
    base_url = str(request.base_url) + "dicomweb/studies/"
    try:
        for part in parts:
            outcome = await run_in_threadpool(_ingest_part, runtime, part, study_uid, actor_of(request))
            result, reason = outcome
            if result is not None and result.reason == BACKPRESSURE_REASON:
                busy.append(result)
            if reason is None:
                referenced.append(_referenced_item(result, base_url))  # type: ignore[arg-type]
            else:
                failed.append(_failed_item(result, reason))
    finally:
        for part in parts:
            await asyncio.to_thread(part.path.unlink, missing_ok=True)

    body: dict[str, Any] = {}
    if study_uid:
        body["00081190"] = {"vr": "UR", "Value": [base_url + quote(study_uid)]}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if not parts:
        return JSONResponse({"error": "no parts"}, status_code=400)
    if not failed:
        status = 200
    elif referenced:
        status = 202
    elif busy and len(busy) == len(failed):
        # Back-pressure: nothing was kept; the client should come back later
        return JSONResponse(body, status_code=503, media_type=DICOM_JSON, headers={"Retry-After": "30"})
    else:
        too_large = all(f["00081197"]["Value"][0] == 0xA700 for f in failed)
        status = 413 if too_large and _all_too_large(parts, settings.max_instance_bytes) else 409
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


def _all_too_large(parts: list[Part], limit: int) -> bool:
    return all(part.size > limit for part in parts)


def _ingest_part(
    runtime: Any, part: Part, study_uid: str | None, actor: Actor
) -> tuple[IngestResult | None, int | None]:
    content_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if content_type != "application/dicom":
        return None, 0xC000
    try:
        result: IngestResult = runtime.ingestor.ingest_file(
            part.path, source="stow", move=True, expected_study_instance_uid=study_uid, actor=actor
        )
    except Exception:
        LOGGER.exception("STOW part failed", extra=fields(source="stow"))
        return None, PROCESSING_FAILURE
    if result.status.accepted:
        return result, None
    if result.reason == STUDY_MISMATCH_REASON:
        return result, STUDY_MISMATCH
    return result, FAILURE_REASON.get(result.status, PROCESSING_FAILURE)
