"""Retention rules through the CLI on a real catalog: an expired study is deleted (tombstone,
audit event, objects freed); one without a rule, or recent, is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service.catalog.retention import RetentionRules
from service.catalog.tables import AuditEvent, Instance, Study, Tombstone
from tests.archive_support import ct_dataset, part10_bytes


def test_rules_parse_and_keep_the_longest() -> None:
    rules = RetentionRules.parse("CR:3650, MG:0,*:7300")
    assert rules.keep_days({"CR"}) == 3650
    assert rules.keep_days({"CR", "CT"}) == 7300  # the longest applies
    assert rules.keep_days({"MG", "CR"}) is None  # 0 keeps forever
    for bad in ("CR", "CR:ten", ":5"):
        try:
            RetentionRules.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_retention_cli_deletes_expired_studies(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming-files"
    incoming.mkdir()
    old = ct_dataset(seed=1, patient_id="P-OLD")
    old.Modality, old.StudyDate = "CR", "20010101"
    recent = ct_dataset(seed=2, patient_id="P-NEW")
    recent.Modality, recent.StudyDate = "CR", date.today().strftime("%Y%m%d")
    other = ct_dataset(seed=3, patient_id="P-OTHER")
    other.Modality, other.StudyDate = "US", "19990101"  # no rule for US, no "*": kept
    for name, ds in (("old", old), ("recent", recent), ("other", other)):
        (incoming / f"{name}.dcm").write_bytes(part10_bytes(ds))
    database = tmp_path / "catalog.sqlite3"
    env = {
        **os.environ,
        "ARCHIVE_DATA_DIR": str(tmp_path / "var"),
        "ARCHIVE_DATABASE_URL": f"sqlite:///{database}",
        "ARCHIVE_RETENTION_RULES": "CR:3650",
    }
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "import", str(incoming), "--quiet"], env=env, check=True, capture_output=True)
    engine = create_engine(f"sqlite:///{database}")
    with Session(engine) as session:
        staged = session.scalars(
            select(Instance.staging_key).where(Instance.sop_instance_uid == old.SOPInstanceUID)
        ).one()
    assert staged and (tmp_path / "var" / "store" / staged).exists()

    dry = subprocess.run([*cli, "retention"], env=env, check=True, capture_output=True, text=True)
    assert json.loads(dry.stdout.splitlines()[-1]) == {"expired_studies": 1, "applied": False}
    with Session(engine) as session:
        assert session.scalar(select(Study).where(Study.study_instance_uid == old.StudyInstanceUID)) is not None

    subprocess.run([*cli, "retention", "--apply"], env=env, check=True, capture_output=True, text=True)
    with Session(engine) as session:
        remaining = set(session.scalars(select(Study.study_instance_uid)))
        assert remaining == {recent.StudyInstanceUID, other.StudyInstanceUID}
        tombstone = session.scalars(select(Tombstone)).one()
        assert (tombstone.level, tombstone.uid, tombstone.instances) == ("study", old.StudyInstanceUID, 1)
        audit = session.scalars(select(AuditEvent).where(AuditEvent.interface == "retention")).one()
        assert audit.study_instance_uid == old.StudyInstanceUID and audit.action == "delete"
    assert not (tmp_path / "var" / "store" / staged).exists()
    engine.dispose()
