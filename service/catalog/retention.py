"""Retention rules: studies older than their modality's retention period are deleted (with a
tombstone and an audit event), e.g. ARCHIVE_RETENTION_RULES="MG:3650,CR:3650,*:0" - days since the
study date per modality; 0 keeps forever; a study is kept as long as any of its modalities says so."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.catalog.tables import Series, Study


@dataclass(frozen=True)
class RetentionRules:
    days: dict[str, int]  # modality (or "*") -> days; 0 = forever

    @classmethod
    def parse(cls, text: str) -> RetentionRules:
        days: dict[str, int] = {}
        for entry in filter(None, (e.strip() for e in text.split(","))):
            modality, _, value = entry.partition(":")
            if not modality.strip() or not value.strip().isdigit():
                raise ValueError(f"retention rule {entry!r} is not MODALITY:DAYS")
            days[modality.strip().upper()] = int(value)
        return cls(days)

    def keep_days(self, modalities: set[str]) -> int | None:
        """None: keep forever.  A study with several modalities is kept as long as the longest rule."""
        rules = [self.days.get(m, self.days.get("*", 0)) for m in (modalities or {"*"})]
        return None if not rules or 0 in rules else max(rules)


def expired_studies(session: Session, rules: RetentionRules, today: date | None = None) -> list[str]:
    today = today or date.today()
    if not rules.days:
        return []
    expired = []
    rows = session.execute(
        select(Study.study_instance_uid, Study.study_date, Series.modality).join(Series, Series.study_pk == Study.id)
    ).all()
    studies: dict[str, tuple[str | None, set[str]]] = {}
    for uid, study_date, modality in rows:
        entry = studies.setdefault(uid, (study_date, set()))
        if modality:
            entry[1].add(modality.upper())
    for uid, (study_date, modalities) in studies.items():
        keep = rules.keep_days(modalities)
        if keep is None or not study_date or len(study_date) != 8 or not study_date.isdigit():
            continue  # no rule, or no usable study date: never deleted by age
        try:
            when = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:]))
        except ValueError:
            continue
        if when + timedelta(days=keep) < today:
            expired.append(uid)
    return sorted(expired)
