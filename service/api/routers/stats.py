from __future__ import annotations

from fastapi import APIRouter, Depends

from service.api.deps import SessionDep, require
from service.api.schemas import AUTH
from service.catalog.schemas import Stats
from service.catalog.stats import compute_stats
from service.security import Role

router = APIRouter(tags=["stats"], dependencies=[Depends(require(Role.ADMIN))], responses=AUTH)


@router.get("/stats", response_model=Stats)
def stats(session: SessionDep) -> Stats:
    return compute_stats(session)
