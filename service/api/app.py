"""FastAPI app factory."""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI

from service.api import schemas
from service.api.routers import admin, dicomweb, health, instances, qido, stats, wado
from service.runtime import Runtime

# STOW-RS (routers/dicomweb.py) answers these besides 200; documented here, where its router is included
_STOW_BODY = {schemas.DICOM_JSON: {"type": "object"}}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: schemas.content(_STOW_BODY, "Every instance stored (PS3.18 10.5.3)"),
    202: schemas.content(_STOW_BODY, "Some instances stored, some not (FailedSOPSequence)"),
    409: schemas.content(_STOW_BODY, "No instance stored (FailedSOPSequence)"),
    **schemas.AUTH,
    **schemas.dicomweb_errors(400, 413, 415, e400="Malformed multipart body, or a malformed Study Instance UID"),
    503: schemas.content(
        _STOW_BODY,
        "Back-pressure (queue or disk): nothing was stored; come back after Retry-After",
        headers=schemas.RETRY_AFTER,
    ),
}


def build_app() -> FastAPI:
    """The routes, without a runtime: what `create_app` serves, and what its OpenAPI schema describes."""
    app = FastAPI(title="LVPNet Archive", version="0.1.0")
    schemas.install(app)
    for router in (
        health.router,
        stats.router,
        instances.router,
        dicomweb.router,
        qido.router,
        wado.router,
        admin.pages,
        admin.api,
    ):
        app.include_router(router, responses=STOW_RESPONSES if router is dicomweb.router else None)
    return app


def create_app(runtime: Runtime) -> FastAPI:
    app = build_app()
    app.state.runtime = runtime
    threading.Thread(target=admin.warm_cache, args=(runtime,), name="dashboard-warm-up", daemon=True).start()
    return app
