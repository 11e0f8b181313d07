"""What the OpenAPI schema documents beside the routes themselves: error bodies, the error statuses of
each kind of route (with their headers), the media types of non-JSON answers, the QIDO-RS query
parameters, and the handler that turns FastAPI's 422 into the 400 the rest of the API answers."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service.catalog.query import ATTRIBUTES

DICOM_JSON = "application/dicom+json"
BINARY = {"type": "string", "format": "binary"}


class Reason(BaseModel):
    """Authentication, authorization and admin API errors (FastAPI's HTTPException body)."""

    detail: str


class DicomwebError(BaseModel):
    """DICOMweb errors (QIDO-RS, WADO-RS, STOW-RS before any part is read)."""

    error: str


class DicomJSONResponse(JSONResponse):
    media_type = DICOM_JSON


class MultipartResponse(Response):
    media_type = "multipart/related"


class CsvResponse(Response):
    media_type = "text/csv"


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
WARNING = {
    "Warning": {
        "description": 'PS3.18 8.3.4.5: `299 lvpnet-archive "<text>"` (more results, limit reduced, keys ignored)',
        "schema": {"type": "string"},
    }
}
LOCATION = {"Location": {"description": "where to go", "schema": {"type": "string"}}}

_DESCRIPTIONS = {
    400: "Malformed request: a path or query parameter, the body",
    404: "Not found",
    406: "None of the media types (and transfer syntaxes) in Accept can be served",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported Content-Type",
    500: "The instance failed its SHA-256 verification (marked corrupt); nothing of it was sent",
    503: "Not now: back-pressure, a decode that did not finish in time, or the store/worker unavailable",
}


def _json(model: type[BaseModel]) -> dict[str, Any]:
    # A reference, not FastAPI's `model`: that would document the error under the route's own media
    # type (multipart/related for WADO-RS, text/csv, ...), and errors are always application/json
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}


AUTH: dict[int | str, dict[str, Any]] = {
    401: {
        "content": _json(Reason),
        "description": "No valid credentials: an API key (`Authorization: Bearer lvpa_...`) or the dashboard session",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: {
        "content": _json(Reason),
        "description": "The caller's role may not use this route (or a session request that changes state "
        "lacks `X-Requested-With: lvpnet-archive`)",
    },
}


def _errors(model: type[BaseModel], codes: tuple[int, ...], notes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"content": _json(model), "description": notes.get(code, _DESCRIPTIONS[code])}
        if code == 503:
            entry["headers"] = RETRY_AFTER
        out[code] = entry
    return out


def dicomweb_errors(*codes: int, **notes: str) -> dict[int | str, dict[str, Any]]:
    """`{"error": reason}` answers; `notes` overrides a description (`e404="..."`)."""
    return _errors(DicomwebError, codes, {int(k[1:]): v for k, v in notes.items()})


def reasons(*codes: int, **notes: str) -> dict[int | str, dict[str, Any]]:
    """`{"detail": reason}` answers (HTTPException)."""
    return _errors(Reason, codes, {int(k[1:]): v for k, v in notes.items()})


def content(media_types: dict[str, dict[str, Any]], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {m: {"schema": s} for m, s in media_types.items()}, **extra}


DICOM_JSON_ARRAY = {"type": "array", "items": {"type": "object"}}

# PS3.18 10.6.1.2: the query parameters QIDO-RS understands (matching keys by keyword; tags work too)
QIDO_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "description": "results per response (default 1000, at most 10000)",
        "schema": {"type": "integer", "minimum": 0},
    },
    {"name": "offset", "in": "query", "description": "results to skip", "schema": {"type": "integer", "minimum": 0}},
    {
        "name": "includefield",
        "in": "query",
        "description": "keywords or tags to return (comma-separated or repeated), or `all`",
        "schema": {"type": "string"},
    },
    {
        "name": "fuzzymatching",
        "in": "query",
        "description": "not supported: matching is literal (a Warning says so)",
        "schema": {"type": "boolean"},
    },
    *(
        {
            "name": attribute.keyword,
            "in": "query",
            "description": f"matching key ({attribute.vr}); see docs/conformance.md",
            "schema": {"type": "string"},
        }
        for attribute in ATTRIBUTES
        if attribute.matchable
    ),
]


def _validation_message(exc: RequestValidationError) -> str:
    """Where and what, never the value sent (it may be anything)."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body"))
        problems.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(problems)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """400, not FastAPI's 422: what QIDO-RS/WADO-RS answer for a malformed parameter (PS3.18 8.6.3)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _validation_message(exc)}, status_code=400)


def install(app: FastAPI) -> None:
    """The 400 handler, and an OpenAPI schema that documents 400 where FastAPI would have said 422."""
    app.add_exception_handler(RequestValidationError, validation_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    responses = operation.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": _DESCRIPTIONS[400], "content": _json(Reason)}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in (Reason, DicomwebError):
                components.setdefault(model.__name__, model.model_json_schema())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
