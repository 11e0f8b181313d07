"""Structured (JSON lines) logging.  Callers pass facts in `extra={"fields": {...}}`; no patient data
is ever logged: no names, IDs, dates, and no UIDs either (some embed dates) - catalog ids only."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_configured = False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            # The exception's type only: messages from parsers can quote dataset values
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    global _configured
    if _configured:
        logging.getLogger().setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party loggers quote dataset contents (pynetdicom logs identifiers at debug/info)
    for noisy in ("pynetdicom", "pydicom", "botocore", "boto3", "urllib3", "uvicorn.access", "celery", "kombu"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.Formatter.converter = time.gmtime
    _configured = True


def fields(**values: Any) -> dict[str, Any]:
    """`log.info("msg", extra=fields(instance=3))`"""
    return {"fields": values}
