"""QIDO-RS (PS3.18 10.6): GET /dicomweb/studies, .../series, .../instances, answered from the
catalog by the query engine that C-FIND uses too (service.catalog.query)."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset

from service.api.accept import accepts_json
from service.api.deps import SessionDep, actor_of, require
from service.api.schemas import (
    AUTH,
    DICOM_JSON_ARRAY,
    QIDO_PARAMETERS,
    WARNING,
    DicomJSONResponse,
    content,
    dicomweb_errors,
)
from service.audit import event as audit_event
from service.catalog.query import MORE_RESULTS_WARNING, Level, QueryError, parse_qido, scope_exists, search_page
from service.dicomfile import is_valid_uid
from service.logs import fields
from service.security import Role

LOGGER = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
router = APIRouter(
    prefix="/dicomweb",
    tags=["qido-rs"],
    dependencies=[Depends(require(Role.READER))],
    default_response_class=DicomJSONResponse,
    responses={
        200: content({DICOM_JSON: DICOM_JSON_ARRAY}, "The matches (`[]` when none)", headers=WARNING),
        **AUTH,
        **dicomweb_errors(400, 406, e400="An unknown parameter, a malformed value, limit or offset, or UID"),
    },
)
SEARCH = {"openapi_extra": {"parameters": QIDO_PARAMETERS}}
SCOPED = {**SEARCH, "responses": dicomweb_errors(404, e404="The study (or series) in the path holds nothing visible")}
WARN_AGENT = "lvpnet-archive"


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _retrieve_url(base: str, ds: Dataset, level: Level) -> str:
    url = f"{base}dicomweb/studies/{quote(str(ds.StudyInstanceUID), safe='')}"
    if level >= Level.SERIES:
        url += f"/series/{quote(str(ds.SeriesInstanceUID), safe='')}"
    if level == Level.IMAGE:
        url += f"/instances/{quote(str(ds.SOPInstanceUID), safe='')}"
    return url


def _json(ds: Dataset, level: Level, base: str) -> dict[str, Any]:
    item = ds.to_json_dict()
    item["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, ds, level)]}
    return dict(sorted(item.items()))


def _search(request: Request, session: Any, level: Level, scope: dict[str, str]) -> Response:
    if not accepts_json(request.headers.get("accept")):
        return _error(406, f"search results are {DICOM_JSON} (or application/json)")
    for keyword, uid in scope.items():
        if not is_valid_uid(uid):
            return _error(400, f"malformed {keyword}")
    started = time.monotonic()
    try:
        query = parse_qido(level, request.query_params.multi_items(), scope)
    except QueryError as exc:
        return _error(400, exc.reason)
    if not scope_exists(session, scope):
        return _error(404, "no such series" if "SeriesInstanceUID" in scope else "no such study")
    page = search_page(session, query)
    base = str(request.base_url)
    body = [_json(ds, level, base) for ds in page.datasets]
    session.add(
        audit_event(
            actor_of(request),
            "query",
            "qido",
            study=scope.get("StudyInstanceUID"),
            series=scope.get("SeriesInstanceUID"),
            detail=f"{level.name} ?{request.url.query} -> {len(body)} results",
        )
    )
    session.commit()
    response = JSONResponse(body, media_type=DICOM_JSON)
    warnings = [*query.warnings, *([MORE_RESULTS_WARNING] if page.more else [])]
    for text in warnings:
        response.headers.append("Warning", f'299 {WARN_AGENT} "{text}"')
    LOGGER.info(
        "QIDO-RS search",
        extra=fields(
            query_level=level.name.lower(),
            keys=len(query.matches),
            results=len(body),
            more=page.more,
            ms=round((time.monotonic() - started) * 1000, 1),
        ),
    )
    return response


# Plain `def`: FastAPI runs these (and the session dependency) in its threadpool


@router.get("/studies", **SEARCH)
def search_studies(request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.STUDY, {})


@router.get("/series", **SEARCH)
def search_series(request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.SERIES, {})


@router.get("/instances", **SEARCH)
def search_instances(request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.IMAGE, {})


@router.get("/studies/{study}/series", **SCOPED)
def search_study_series(study: str, request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.SERIES, {"StudyInstanceUID": study})


@router.get("/studies/{study}/instances", **SCOPED)
def search_study_instances(study: str, request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.IMAGE, {"StudyInstanceUID": study})


@router.get("/studies/{study}/series/{series}/instances", **SCOPED)
def search_series_instances(study: str, series: str, request: Request, session: SessionDep) -> Response:
    return _search(request, session, Level.IMAGE, {"StudyInstanceUID": study, "SeriesInstanceUID": series})
