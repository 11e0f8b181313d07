from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from sqlalchemy import select

from service.api.deps import SessionDep, require
from service.api.schemas import AUTH, reasons
from service.catalog.schemas import InstanceStatus
from service.catalog.tables import Instance
from service.dicomfile import is_valid_uid
from service.security import Role

router = APIRouter(prefix="/instances", tags=["instances"], dependencies=[Depends(require(Role.ADMIN))], responses=AUTH)


def _aware(value: Any) -> Any:
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


def _status(instance: Instance) -> InstanceStatus:
    status = InstanceStatus.model_validate(instance, from_attributes=True)
    # SQLite keeps no time zone, and the catalog's times are UTC (tables.utcnow): say so, as the
    # schema's date-time (RFC 3339) requires, and as PostgreSQL's answers already do
    return status.model_copy(update={name: _aware(value) for name, value in status})


@router.get(
    "/{sop_instance_uid}",
    response_model=list[InstanceStatus],
    responses=reasons(400, 404, e400="Malformed SOP Instance UID", e404="No version of that instance is held"),
)
def instance_versions(sop_instance_uid: str, session: SessionDep) -> list[InstanceStatus]:
    """Every version held of one SOP instance, newest first: archival state and sizes."""
    if not is_valid_uid(sop_instance_uid):
        raise HTTPException(400, "malformed UID")
    rows = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Instance.version.desc())
    ).all()
    if not rows:
        raise HTTPException(404, "no such instance")
    return [_status(row) for row in rows]
