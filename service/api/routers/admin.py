"""The admin dashboard (`/admin`) and its JSON API (`/admin/api/...`): savings, pipeline health,
study drill-down, audit trail (and CSV), API keys, deletion.  Admin role only; the page logs in
with the admin password or an admin API key and keeps a signed, HttpOnly, SameSite session cookie."""

from __future__ import annotations

import csv
import io
import logging
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.deps import RuntimeDep, SessionDep, actor_of, require
from service.api.schemas import AUTH, LOCATION, CsvResponse, content, reasons
from service.audit import Actor
from service.audit import event as audit_event
from service.catalog import admin as figures
from service.catalog.tables import ApiKey
from service.dicomfile import is_valid_uid
from service.logs import fields
from service.security import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    Principal,
    Role,
    authenticate_key,
    authenticate_password,
    create_key,
    revoke_key,
    sign_session,
    verify_session,
)

LOGGER = logging.getLogger(__name__)
DASHBOARD = Path(__file__).resolve().parent.parent.parent / "dashboard"
AdminDep = Annotated[Principal, Depends(require(Role.ADMIN))]

LOGIN_BODY_LIMIT = 4096  # one urlencoded field
MAX_OFFSET = 999_999_999  # as QIDO-RS's offset
pages = APIRouter(prefix="/admin", tags=["dashboard"])
api = APIRouter(prefix="/admin/api", tags=["admin"], dependencies=[Depends(require(Role.ADMIN))], responses=AUTH)
HTML = {200: content({"text/html": {"type": "string"}}, "The page")}


def _redirect(description: str) -> dict[int | str, dict[str, Any]]:
    return {303: {"description": description, "headers": LOCATION}}


# ------------------------------------------------------------------------------ pages


def _session_principal(request: Request, runtime: Any) -> Principal | None:
    if not runtime.settings.require_auth:
        return Principal("anonymous", Role.ADMIN, "anonymous")
    cookie = request.cookies.get(SESSION_COOKIE)
    principal = verify_session(cookie, runtime.session_secret) if cookie else None
    return principal if principal is not None and principal.role == Role.ADMIN else None


@pages.get("", response_class=HTMLResponse, responses={**HTML, **_redirect("No admin session: to /admin/login")})
def dashboard(request: Request, runtime: RuntimeDep) -> Response:
    if _session_principal(request, runtime) is None:
        return RedirectResponse("/admin/login", status_code=303)
    return HTMLResponse((DASHBOARD / "index.html").read_text())


@pages.get("/login", response_class=HTMLResponse)
def login_page(error: str = "") -> HTMLResponse:
    page = (DASHBOARD / "login.html").read_text()
    message = '<p class="error" id="login-error">Wrong password or key.</p>' if error else ""
    return HTMLResponse(page.replace("<!--error-->", message))


@pages.post(
    "/login",
    status_code=303,
    response_class=RedirectResponse,
    responses={
        **_redirect("To /admin with a session cookie, or back to /admin/login?error=1"),
        **reasons(413, e413=f"A body over {LOGIN_BODY_LIMIT} bytes"),
    },
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": {"secret": {"type": "string"}}}
                }
            }
        }
    },
)
async def login(request: Request, runtime: RuntimeDep) -> Response:
    # A urlencoded form, parsed here: python-multipart is not needed for one field.  Read no more
    # than that can take: anyone may post here
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_LIMIT:
            return JSONResponse({"detail": "login form too large"}, status_code=413)
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    secret = form.get("secret", [""])[0]
    return await run_in_threadpool(_login, request, runtime, secret)


def _login(request: Request, runtime: Any, secret: str) -> Response:
    with runtime.session_factory() as session:
        principal = authenticate_password(session, secret) if secret else None
        if principal is None and secret:
            by_key = authenticate_key(session, secret)
            principal = by_key if by_key is not None and by_key.role == Role.ADMIN else None
    remote = request.client.host if request.client else None
    actor = Actor(principal.name if principal else "unknown", "session", remote)
    runtime.auditor.record(actor, "login", "dashboard", "ok" if principal else "refused")
    if principal is None:
        LOGGER.warning("dashboard login refused", extra=fields(remote=remote))
        return RedirectResponse("/admin/login?error=1", status_code=303)
    response = RedirectResponse("/admin", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        sign_session(Principal(principal.name, Role.ADMIN, "session"), runtime.session_secret),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=bool(runtime.settings.http_tls_cert),
        path="/",
    )
    return response


@pages.post(
    "/logout",
    status_code=303,
    response_class=RedirectResponse,
    responses=_redirect("To /admin/login, the session cookie cleared"),
)
def logout() -> Response:
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@pages.get(
    "/static/{name}",
    response_class=FileResponse,
    responses={
        200: content({"text/javascript": {"type": "string"}, "text/css": {"type": "string"}}, "The file"),
        **reasons(404),
    },
)
def static(name: str) -> Response:
    allowed = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
    if name not in allowed:
        raise HTTPException(404, "no such file")
    return FileResponse(DASHBOARD / name, media_type=allowed[name])


# ------------------------------------------------------------------------------ JSON API


CACHE = figures.CachedFigures()


def warm_cache(runtime: Any) -> None:
    """Compute the whole-catalog figures at start-up, so the first dashboard load does not wait."""
    try:
        savings(runtime)
        pipeline_health(runtime)
    except Exception as exc:
        LOGGER.warning("dashboard figures not precomputed", extra=fields(error=type(exc).__name__))


@api.get("/savings")
def savings(runtime: RuntimeDep, days: Annotated[int, Query(ge=1, le=3650)] = 60) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        with runtime.session_factory() as session:
            return figures.savings(session, days)

    value, age = CACHE.get(f"savings:{days}", compute)
    return {**value, "age_seconds": round(age, 1)}


@api.get("/health")
def pipeline_health(runtime: RuntimeDep) -> dict[str, Any]:
    def compute() -> dict[str, Any]:
        with runtime.session_factory() as session:
            return figures.health(session, runtime.settings.lease_seconds)

    value, age = CACHE.get("health", compute)
    return {**value, "age_seconds": round(age, 1)}


@api.get("/studies")
def studies(
    session: SessionDep,
    q: Annotated[str, Query(max_length=64)] = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[dict[str, Any]]:
    return figures.search_studies(session, q.strip(), limit)


@api.get("/studies/{study}", responses=reasons(400, 404, e400="Malformed Study Instance UID"))
def study(study: str, session: SessionDep) -> dict[str, Any]:
    if not is_valid_uid(study):
        raise HTTPException(400, "malformed Study Instance UID")
    detail = figures.study_detail(session, study)
    if detail is None:
        raise HTTPException(404, "no such study")
    return detail


@api.get("/tombstones")
def deleted(session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    return figures.tombstones(session, limit)


def _audit_filters(
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=16)] = None,
    study: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100000)] = 200,
    # Bounded: a database integer (SQLite, PostgreSQL bigint) overflows at 2**63, and that was a 500
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    return {"actor": actor, "action": action, "study": study, "limit": limit, "offset": offset}


@api.get("/audit")
def audit(session: SessionDep, filters: Annotated[dict[str, Any], Depends(_audit_filters)]) -> list[dict[str, Any]]:
    return figures.audit_events(session, **filters)


@api.get("/audit.csv", response_class=CsvResponse, responses={200: content({"text/csv": {"type": "string"}}, "CSV")})
def audit_csv(session: SessionDep, filters: Annotated[dict[str, Any], Depends(_audit_filters)]) -> Response:
    rows = figures.audit_events(session, **filters)
    buffer = io.StringIO()
    columns = list(rows[0]) if rows else ["at", "actor", "action"]
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return Response(
        buffer.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="audit.csv"'},
    )


KEY_NAME = r"^[A-Za-z0-9._@-]+$"


class KeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=KEY_NAME)
    role: Role


def _iso(value: datetime) -> str:
    """UTC with its offset, also from SQLite (which keeps no time zone)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


@api.get("/keys")
def keys(session: SessionDep) -> list[dict[str, Any]]:
    return [
        {
            "name": k.name,
            "role": k.role,
            "prefix": k.prefix,
            "created_at": _iso(k.created_at),
            "revoked": k.revoked_at is not None,
            "last_used_at": _iso(k.last_used_at) if k.last_used_at else None,
        }
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id))
    ]


async def _key_request(request: Request) -> KeyRequest:
    """The body, read only once the caller is known to be an admin (a dependency runs after the
    router's; a body parameter would be read, and refused, before the credentials are looked at)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_LIMIT:
            raise HTTPException(413, "body too large")
    try:
        return KeyRequest.model_validate_json(bytes(body))
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise HTTPException(400, where) from None


@api.post(
    "/keys",
    status_code=201,
    responses=reasons(400, 409, 413, e409="A key of that name exists", e413="A body over 4096 bytes"),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["name", "role"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": KEY_NAME},
                            "role": {"type": "string", "enum": [str(role) for role in Role]},
                        },
                    }
                }
            },
        }
    },
)
def new_key(
    body: Annotated[KeyRequest, Depends(_key_request)], request: Request, session: SessionDep
) -> dict[str, str]:
    try:
        key = create_key(session, body.name, body.role)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from exc
    session.add(audit_event(actor_of(request), "admin", "keys", detail=f"created key {body.name} ({body.role})"))
    session.commit()
    return {"name": body.name, "role": str(body.role), "key": key}


@api.delete("/keys/{name}", responses=reasons(404, e404="No active key of that name"))
def delete_key(name: str, request: Request, session: SessionDep) -> dict[str, str]:
    if not revoke_key(session, name):
        raise HTTPException(404, "no such active key")
    session.add(audit_event(actor_of(request), "admin", "keys", detail=f"revoked key {name}"))
    session.commit()
    return {"revoked": name}


DELETE_RESPONSES = reasons(400, 404, e400="Malformed UID", e404="Nothing of that UID is held")


async def _delete(level: str, uid: str, request: Request, runtime: Any, reason: str | None) -> JSONResponse:
    if not is_valid_uid(uid):
        raise HTTPException(400, "malformed UID")
    actor = actor_of(request)

    def work() -> tuple[int, list[str]]:
        with runtime.session_factory() as session:
            removed, orphans = figures.delete_entity(session, level, uid, actor.name, reason)
            if removed:
                what = {"study": uid} if level == "study" else {"series": uid} if level == "series" else {"sop": uid}
                session.add(
                    audit_event(
                        actor, "delete", "admin", detail=f"{level}: {removed} instances; {reason or ''}", **what
                    )
                )
            session.commit()
        for key in orphans:  # after the commit: a crash leaves an orphan object, never a dangling row
            runtime.store.delete(key)
        return removed, orphans

    removed, orphans = await run_in_threadpool(work)
    if not removed:
        raise HTTPException(404, f"no such {level}")
    LOGGER.info("deleted", extra=fields(level=level, instances=removed, objects=len(orphans)))
    return JSONResponse({"level": level, "uid": uid, "instances": removed, "objects_deleted": len(orphans)})


@api.delete("/studies/{uid}", responses=DELETE_RESPONSES)
async def delete_study(uid: str, request: Request, runtime: RuntimeDep, reason: str | None = None) -> JSONResponse:
    return await _delete("study", uid, request, runtime, reason)


@api.delete("/series/{uid}", responses=DELETE_RESPONSES)
async def delete_series(uid: str, request: Request, runtime: RuntimeDep, reason: str | None = None) -> JSONResponse:
    return await _delete("series", uid, request, runtime, reason)


@api.delete("/instances/{uid}", responses=DELETE_RESPONSES)
async def delete_instance(uid: str, request: Request, runtime: RuntimeDep, reason: str | None = None) -> JSONResponse:
    return await _delete("instance", uid, request, runtime, reason)
