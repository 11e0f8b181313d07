"""FastAPI app factory."""

from __future__ import annotations

import threading

from fastapi import FastAPI

from service.api.routers import admin, dicomweb, health, instances, qido, stats, wado
from service.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="LVPNet Archive", version="0.1.0")
    app.state.runtime = runtime
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
        app.include_router(router)
    threading.Thread(target=admin.warm_cache, args=(runtime,), name="dashboard-warm-up", daemon=True).start()
    return app
