from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from sqlalchemy import select

from service.api.deps import SessionDep, require
from service.catalog.schemas import InstanceStatus
from service.catalog.tables import Instance
from service.dicomfile import is_valid_uid
from service.security import Role

router = APIRouter(prefix="/instances", tags=["instances"], dependencies=[Depends(require(Role.ADMIN))])


def _status(instance: Instance) -> InstanceStatus:
    return InstanceStatus.model_validate(instance, from_attributes=True)


@router.get("/{sop_instance_uid}", response_model=list[InstanceStatus])
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
