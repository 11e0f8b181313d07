"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data, SHA-256 verified.

Every instance is rebuilt and checked against the catalog's SHA-256 before its first byte is sent.
Multipart responses are streamed instance by instance (the next one is prepared while the current
one is sent); the first is prepared before the status line, so a failure there is a proper error
status.  A failure after the first part ends the stream without its closing boundary: the client
sees a truncated response, never wrong bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import metrics
from service.api.accept import DICOM, DICOM_JSON, OCTET_STREAM, NotAcceptable, Packaging, accepts_json, negotiate
from service.api.deps import RuntimeDep, actor_of, require
from service.api.schemas import (
    AUTH,
    BINARY,
    DICOM_JSON_ARRAY,
    DicomJSONResponse,
    MultipartResponse,
    content,
    dicomweb_errors,
)
from service.audit import Actor
from service.dicomfile import is_valid_uid
from service.dicomweb import ResourceError, bulkdata, frames, metadata, parse_frame_list
from service.logs import fields
from service.retrieve import (
    CorruptInstance,
    InstanceRef,
    RetrieveError,
    RetrieveTimeout,
    RetrieveUnavailable,
    find_refs,
)
from service.security import Role
from service.transcode import ORIGINAL, TRANSCODE_TARGETS, TranscodeError, transcode

LOGGER = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5
router = APIRouter(
    prefix="/dicomweb",
    tags=["wado-rs"],
    dependencies=[Depends(require(Role.READER))],
    default_response_class=MultipartResponse,
    responses={
        **AUTH,
        **dicomweb_errors(
            400,
            404,
            406,
            500,
            503,
            e400="Malformed UID in the path (or frame list, or tag)",
            e404="No such study, series or instance (or frame, or element)",
        ),
    },
)
_PARTS = "multipart/related (type in the Content-Type parameter), one part per instance, streamed"
INSTANCES = {"responses": {200: content({"multipart/related": BINARY}, _PARTS)}}
ONE_INSTANCE = {
    "responses": {
        200: content(
            {"multipart/related": BINARY, DICOM: BINARY},
            "The instance: multipart/related, or application/dicom when Accept asks for a single part",
        )
    }
}
METADATA = {
    "response_class": DicomJSONResponse,
    "responses": {200: content({DICOM_JSON: DICOM_JSON_ARRAY}, "DICOM JSON, one object per instance")},
}
OCTETS = {"responses": {200: content({"multipart/related": BINARY}, "application/octet-stream parts, little endian")}}


@dataclass(frozen=True)
class Prepared:
    ref: InstanceRef
    data: bytes
    transfer_syntax_uid: str
    sha256: str  # of `data`

    @property
    def transcoded(self) -> bool:
        return self.sha256 != self.ref.original_sha256


def _error(status: int, reason: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _retrieve_error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, NotAcceptable | TranscodeError):
        return _error(406, str(exc))
    if isinstance(exc, ResourceError):
        return _error(exc.status, str(exc))
    if isinstance(exc, RetrieveTimeout | RetrieveUnavailable):
        return _error(503, str(exc))
    if isinstance(exc, CorruptInstance):
        return _error(500, str(exc))
    raise exc


def _outcome(exc: Exception | None) -> str:
    return {
        None: "ok",
        CorruptInstance: "corrupt",
        RetrieveTimeout: "timeout",
        RetrieveUnavailable: "unavailable",
    }.get(type(exc) if exc else None, "not-acceptable")


def prepare(runtime: Any, ref: InstanceRef, syntaxes: tuple[str, ...]) -> Prepared:
    """The verified original, or its lossless transcode into the first acceptable syntax."""
    data = runtime.retriever.fetch(ref)
    problems = []
    for syntax in syntaxes:
        if syntax in (ORIGINAL, ref.transfer_syntax_uid):
            return Prepared(ref, data, ref.transfer_syntax_uid, ref.original_sha256)
        if syntax in TRANSCODE_TARGETS:
            try:
                out = transcode(data, syntax)
            except TranscodeError as exc:
                problems.append(str(exc))
                continue
            return Prepared(ref, out.data, out.transfer_syntax_uid, hashlib.sha256(out.data).hexdigest())
    detail = "; ".join(problems) or f"offered: *, the stored syntax, {', '.join(TRANSCODE_TARGETS)}"
    raise NotAcceptable(f"instance cannot be served in {', '.join(syntaxes)} ({detail})")


def audited_prepare(runtime: Any, ref: InstanceRef, syntaxes: tuple[str, ...], actor: Actor) -> Prepared:
    """`prepare`, with an audit event for the instance sent (or refused)."""
    what = {"study": ref.study_instance_uid, "series": ref.series_instance_uid, "sop": ref.sop_instance_uid}
    try:
        prepared = prepare(runtime, ref, syntaxes)
    except Exception as exc:
        runtime.auditor.record(actor, "retrieve", "wado", "failed", detail=str(exc)[:500], **what)
        raise
    runtime.auditor.record(actor, "retrieve", "wado", detail=f"instance {prepared.transfer_syntax_uid}", **what)
    return prepared


def _audit_view(runtime: Any, request: Request, ref: InstanceRef, view: str, outcome: str = "ok") -> None:
    runtime.auditor.record(
        actor_of(request),
        "retrieve",
        "wado",
        outcome,
        study=ref.study_instance_uid,
        series=ref.series_instance_uid,
        sop=ref.sop_instance_uid,
        detail=view,
    )


def _check_uids(*uids: str | None) -> JSONResponse | None:
    if any(uid is not None and not is_valid_uid(uid) for uid in uids):
        return _error(400, "malformed UID in the path")
    return None


def _base(request: Request) -> str:
    return str(request.base_url) + "dicomweb"


def _instance_url(request: Request, ref: InstanceRef) -> str:
    return (
        f"{_base(request)}/studies/{quote(ref.study_instance_uid)}/series/{quote(ref.series_instance_uid)}"
        f"/instances/{quote(ref.sop_instance_uid)}"
    )


async def _refs(runtime: Any, study: str, series: str | None, sop: str | None) -> list[InstanceRef]:
    def load() -> list[InstanceRef]:
        with runtime.session_factory() as session:
            return find_refs(session, study, series, sop)

    return await run_in_threadpool(load)


# ------------------------------------------------------------------------------ instances


def _part(prepared: Prepared, url: str, boundary: str) -> bytes:
    headers = [
        f"--{boundary}",
        f"Content-Type: {DICOM}; transfer-syntax={prepared.transfer_syntax_uid}",
        f"Content-Length: {len(prepared.data)}",
        f"Content-Location: {url}",
        f"X-Content-SHA256: {prepared.sha256}",
    ]
    if prepared.transcoded:
        headers.append(f"X-Original-SHA256: {prepared.ref.original_sha256}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + prepared.data + b"\r\n"


async def _retrieve(request: Request, runtime: Any, study: str, series: str | None, sop: str | None) -> Response:
    bad = _check_uids(study, series, sop)
    if bad is not None:
        return bad
    try:
        packaging = negotiate(request.headers.get("accept"), DICOM, single_allowed=sop is not None)
    except NotAcceptable as exc:
        return _error(406, str(exc))
    refs = await _refs(runtime, study, series, sop)
    if not refs:
        return _error(404, "no such " + ("instance" if sop else "series" if series else "study"))
    try:
        first = await run_in_threadpool(
            audited_prepare, runtime, refs[0], packaging.transfer_syntaxes, actor_of(request)
        )
    except (RetrieveError, NotAcceptable, TranscodeError) as exc:
        metrics.RETRIEVALS.labels(interface="wado", outcome=_outcome(exc)).inc()
        LOGGER.warning("WADO-RS retrieve refused", extra=fields(instance=refs[0].id, reason=str(exc)))
        return _retrieve_error_response(exc)
    metrics.RETRIEVALS.labels(interface="wado", outcome="ok").inc()
    if not packaging.multipart:
        headers = {"ETag": f'"{first.sha256}"', "X-Content-SHA256": first.sha256}
        if first.transcoded:
            headers["X-Original-SHA256"] = first.ref.original_sha256
        return Response(
            first.data,
            media_type=f"{DICOM}; transfer-syntax={first.transfer_syntax_uid}",
            headers=headers,
        )
    boundary = uuid.uuid4().hex
    single = len(refs) == 1
    headers = {"ETag": f'"{first.sha256}"', "X-Content-SHA256": first.sha256} if single else {}
    return StreamingResponse(
        _stream(request, runtime, refs, first, packaging, boundary),
        media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
        headers=headers,
    )


async def _stream(
    request: Request, runtime: Any, refs: list[InstanceRef], first: Prepared, packaging: Packaging, boundary: str
) -> AsyncIterator[bytes]:
    pending: asyncio.Future[Prepared] | None = None
    try:
        for index in range(len(refs)):
            if index == 0:
                prepared = first
            else:
                assert pending is not None
                try:
                    prepared = await pending
                except Exception as exc:
                    metrics.RETRIEVALS.labels(interface="wado", outcome=_outcome(exc)).inc()
                    LOGGER.error(
                        "WADO-RS stream ended early",
                        extra=fields(instance=refs[index].id, reason=str(exc), sent=index, of=len(refs)),
                    )
                    raise
                metrics.RETRIEVALS.labels(interface="wado", outcome="ok").inc()
            if index + 1 < len(refs):  # prepare the next one while this one is sent
                pending = asyncio.ensure_future(
                    run_in_threadpool(
                        audited_prepare, runtime, refs[index + 1], packaging.transfer_syntaxes, actor_of(request)
                    )
                )
            yield _part(prepared, _instance_url(request, prepared.ref), boundary)
        yield f"--{boundary}--\r\n".encode("ascii")
    finally:
        if pending is not None and not pending.done():
            pending.cancel()


@router.get("/studies/{study}", **INSTANCES)
async def retrieve_study(study: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _retrieve(request, runtime, study, None, None)


@router.get("/studies/{study}/series/{series}", **INSTANCES)
async def retrieve_series(study: str, series: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _retrieve(request, runtime, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}", **ONE_INSTANCE)
async def retrieve_instance(study: str, series: str, sop: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _retrieve(request, runtime, study, series, sop)


# ------------------------------------------------------------------------------ metadata


async def _metadata(request: Request, runtime: Any, study: str, series: str | None, sop: str | None) -> Response:
    bad = _check_uids(study, series, sop)
    if bad is not None:
        return bad
    if not accepts_json(request.headers.get("accept")):
        return _error(406, f"metadata is offered as {DICOM_JSON} only")
    refs = await _refs(runtime, study, series, sop)
    if not refs:
        return _error(404, "no such " + ("instance" if sop else "series" if series else "study"))

    def build(ref: InstanceRef) -> dict[str, Any]:
        item = metadata(runtime.retriever.fetch(ref), _instance_url(request, ref), ref.transfer_syntax_uid)
        _audit_view(runtime, request, ref, "metadata")
        return item

    try:
        items = [await run_in_threadpool(build, ref) for ref in refs]
    except RetrieveError as exc:
        LOGGER.warning("WADO-RS metadata refused", extra=fields(reason=str(exc)))
        return _retrieve_error_response(exc)
    return JSONResponse(items, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", **METADATA)
async def study_metadata(study: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _metadata(request, runtime, study, None, None)


@router.get("/studies/{study}/series/{series}/metadata", **METADATA)
async def series_metadata(study: str, series: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _metadata(request, runtime, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", **METADATA)
async def instance_metadata(study: str, series: str, sop: str, request: Request, runtime: RuntimeDep) -> Response:
    return await _metadata(request, runtime, study, series, sop)


# ------------------------------------------------------------------------------ frames, bulk data


def _octet_parts(values: list[bytes], boundary: str, transfer_syntax: str) -> bytes:
    chunks = []
    for value in values:
        head = (
            f"--{boundary}\r\nContent-Type: {OCTET_STREAM}; transfer-syntax={transfer_syntax}\r\n"
            f"Content-Length: {len(value)}\r\n\r\n"
        )
        chunks.append(head.encode("ascii") + value + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks)


async def _octets(
    request: Request,
    runtime: Any,
    study: str,
    series: str,
    sop: str,
    extract: Callable[[bytes], list[bytes]],
    view: str,
) -> Response:
    bad = _check_uids(study, series, sop)
    if bad is not None:
        return bad
    try:
        packaging = negotiate(request.headers.get("accept"), OCTET_STREAM, single_allowed=False)
    except NotAcceptable as exc:
        return _error(406, str(exc))
    # Uncompressed little endian is what these resources give
    if not {ORIGINAL, "1.2.840.10008.1.2.1"} & set(packaging.transfer_syntaxes):
        return _error(406, "frames and bulk data are offered uncompressed (1.2.840.10008.1.2.1) only")
    refs = await _refs(runtime, study, series, sop)
    if not refs:
        return _error(404, "no such instance")

    def build() -> list[bytes]:
        values = extract(runtime.retriever.fetch(refs[0]))
        _audit_view(runtime, request, refs[0], view)
        return values

    try:
        values = await run_in_threadpool(build)
    except (RetrieveError, ResourceError) as exc:
        return _retrieve_error_response(exc)
    boundary = uuid.uuid4().hex
    return Response(
        _octet_parts(values, boundary, "1.2.840.10008.1.2.1"),
        media_type=f'multipart/related; type="{OCTET_STREAM}"; boundary={boundary}',
    )


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame_list}", **OCTETS)
async def retrieve_frames(
    study: str, series: str, sop: str, frame_list: str, request: Request, runtime: RuntimeDep
) -> Response:
    try:
        numbers = parse_frame_list(frame_list)
    except ResourceError as exc:
        return _error(exc.status, str(exc))
    return await _octets(
        request, runtime, study, series, sop, lambda data: frames(data, numbers), f"frames {frame_list[:200]}"
    )


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}", **OCTETS)
async def retrieve_bulkdata(
    study: str, series: str, sop: str, tag: str, request: Request, runtime: RuntimeDep
) -> Response:
    return await _octets(request, runtime, study, series, sop, lambda data: [bulkdata(data, tag)], f"bulkdata {tag}")
