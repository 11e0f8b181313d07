from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import SessionDep
from service.catalog.schemas import Stats
from service.catalog.stats import compute_stats

router = APIRouter(tags=["stats"])


@router.get("/stats", response_model=Stats)
def stats(session: SessionDep) -> Stats:
    return compute_stats(session)
