"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text

from service.api.deps import PrincipalDep, RuntimeDep
from service.api.schemas import AUTH, content
from service.catalog_metrics import CatalogCollector, register_catalog_collector

LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def liveness() -> dict[str, str]:
    """The process answers (no dependency checked: a database outage must not get it restarted)."""
    return {"status": "alive"}


def _check(name: str, probe: Any) -> tuple[str, str]:
    try:
        probe()
        return name, "ok"
    except Exception as exc:  # the reason is the exception type: no connection strings in answers
        LOGGER.warning("readiness check failed", extra={"check": name, "error": type(exc).__name__})
        return name, f"unreachable ({type(exc).__name__})"


READINESS = {"type": "object", "properties": {"ready": {"type": "boolean"}, "checks": {"type": "object"}}}


@router.get(
    "/readyz",
    responses={
        200: content({"application/json": READINESS}, "Ready"),
        503: content({"application/json": READINESS}, "A dependency is unreachable (named in `checks`)"),
    },
)
def readiness(runtime: RuntimeDep) -> JSONResponse:
    """Database, object store and (distributed mode) broker reachable: 200, else 503."""

    def database() -> None:
        with runtime.session_factory() as session:
            session.execute(text("SELECT 1"))

    def store() -> None:
        runtime.store.exists("readiness-probe")

    def broker() -> None:
        import redis

        redis.Redis.from_url(runtime.settings.broker_url, socket_connect_timeout=2, socket_timeout=2).ping()

    checks = [("database", database), ("object_store", store)]
    if runtime.settings.broker_url:
        checks.append(("broker", broker))
    results = dict(_check(name, probe) for name, probe in checks)
    ready = all(value == "ok" for value in results.values())
    return JSONResponse({"ready": ready, "checks": results}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: content({"text/plain": {"type": "string"}}, "Prometheus text format"), **AUTH},
)
def metrics(runtime: RuntimeDep, _: PrincipalDep) -> Response:
    """Any authenticated caller (a Prometheus scraper gets a reader key).  Under `serve`, the
    workers' counters and histograms are merged in (prometheus-client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(CatalogCollector(runtime))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    register_catalog_collector(runtime)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
