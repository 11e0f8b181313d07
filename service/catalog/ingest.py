"""Catalog rows for a received instance: patient, study, series and instance in one transaction.

Patient/study/series attributes that disagree with what an earlier instance said are recorded in
`attribute_conflict`, never silently overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.catalog.tables import AttributeConflict, Instance, InstanceState, Patient, Series, Study
from service.config import DuplicatePolicy
from service.dicomfile import InstanceFacts


class DuplicateOutcome(StrEnum):
    NEW = "new"
    IDENTICAL = "identical"  # same dataset as the current version: nothing stored
    DISCARDED = "discarded"  # differs, keep-first: the first one stays
    REJECTED = "rejected"  # differs, reject policy
    NEW_VERSION = "new-version"  # differs, overwrite policy: stored as the next version


@dataclass(frozen=True)
class Decision:
    outcome: DuplicateOutcome
    version: int = 1
    replaces_pk: int | None = None
    existing_pk: int | None = None


def current_version(session: Session, sop_instance_uid: str) -> Instance | None:
    """The newest version that is not superseded (archived, or still on its way)."""
    return session.scalars(
        select(Instance)
        .where(Instance.sop_instance_uid == sop_instance_uid, Instance.state != InstanceState.SUPERSEDED)
        .order_by(Instance.version.desc())
        .limit(1)
    ).first()


def decide_duplicate(session: Session, facts: InstanceFacts, policy: DuplicatePolicy) -> Decision:
    uid = facts.instance["sop_instance_uid"]
    existing = current_version(session, uid)
    if existing is None:
        top = session.scalar(select(func.max(Instance.version)).where(Instance.sop_instance_uid == uid))
        return Decision(DuplicateOutcome.NEW, version=(top or 0) + 1)
    if existing.dataset_sha256 == facts.digests.dataset_sha256 and existing.state != InstanceState.FAILED:
        return Decision(DuplicateOutcome.IDENTICAL, existing_pk=existing.id)
    if existing.state == InstanceState.FAILED:
        # A version that could not be archived is no reason to refuse a good one
        return Decision(DuplicateOutcome.NEW_VERSION, existing.version + 1, existing.id, existing.id)
    if policy == DuplicatePolicy.KEEP_FIRST:
        return Decision(DuplicateOutcome.DISCARDED, existing_pk=existing.id)
    if policy == DuplicatePolicy.REJECT:
        return Decision(DuplicateOutcome.REJECTED, existing_pk=existing.id)
    # Overwrite: if a newer version is already pending, it is the one the next replaces
    return Decision(DuplicateOutcome.NEW_VERSION, existing.version + 1, existing.id, existing.id)


def _record_conflicts(
    session: Session, level: str, entity: Any, incoming: dict[str, Any], sop_instance_uid: str
) -> None:
    for keyword, value in incoming.items():
        if value is None:
            continue
        current = getattr(entity, keyword)
        if current is None:
            setattr(entity, keyword, value)  # filling a gap is not a conflict
        elif current != value:
            session.add(
                AttributeConflict(
                    level=level,
                    entity_pk=entity.id,
                    keyword=keyword,
                    catalog_value=str(current),
                    incoming_value=str(value),
                    sop_instance_uid=sop_instance_uid,
                )
            )


def _get_or_create(session: Session, model: Any, unique: dict[str, Any], values: dict[str, Any]) -> tuple[Any, bool]:
    query = select(model).filter_by(**unique)
    row = session.scalars(query).first()
    if row is not None:
        return row, False
    try:
        with session.begin_nested():  # another association may be inserting the same row right now
            row = model(**unique, **values)
            session.add(row)
            session.flush()
        return row, True
    except IntegrityError:
        row = session.scalars(query).one()
        return row, False


def add_received_instance(
    session: Session,
    facts: InstanceFacts,
    *,
    decision: Decision,
    staging_key: str,
    source: str,
    lease_seconds: float,
) -> Instance:
    """Insert the rows (caller commits).  The lease set here keeps the sweeper from re-enqueueing
    an instance whose task was just sent; it expires if the task is lost."""
    uid = facts.instance["sop_instance_uid"]
    identity = {k: facts.patient[k] for k in ("patient_id", "issuer_of_patient_id")}
    patient_values = {k: v for k, v in facts.patient.items() if k not in identity}
    patient, created = _get_or_create(session, Patient, identity, patient_values)
    if not created:
        _record_conflicts(session, "patient", patient, patient_values, uid)

    study_values = {k: v for k, v in facts.study.items() if k != "study_instance_uid"}
    study, created = _get_or_create(
        session,
        Study,
        {"study_instance_uid": facts.study["study_instance_uid"]},
        {**study_values, "patient_pk": patient.id},
    )
    if not created:
        _record_conflicts(session, "study", study, study_values, uid)
        if study.patient_pk != patient.id:
            session.add(
                AttributeConflict(
                    level="study",
                    entity_pk=study.id,
                    keyword="patient",
                    catalog_value=str(study.patient_pk),
                    incoming_value=str(patient.id),
                    sop_instance_uid=uid,
                )
            )

    series_values = {k: v for k, v in facts.series.items() if k != "series_instance_uid"}
    series, created = _get_or_create(
        session,
        Series,
        {"series_instance_uid": facts.series["series_instance_uid"]},
        {**series_values, "study_pk": study.id},
    )
    if not created:
        _record_conflicts(session, "series", series, series_values, uid)
    modality = series.modality
    if modality:
        modalities = set(filter(None, study.modalities_in_study.split("\\")))
        if modality not in modalities:
            study.modalities_in_study = "\\".join(sorted(modalities | {modality}))

    instance = Instance(
        **facts.instance,
        version=decision.version,
        replaces_pk=decision.replaces_pk,
        series_pk=series.id,
        source=source,
        state=InstanceState.RECEIVED,
        staging_key=staging_key,
        lease_expires_at=time.time() + lease_seconds,
    )
    session.add(instance)
    session.flush()
    return instance
