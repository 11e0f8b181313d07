"""The embedded worker: polls the catalog for received instances (no broker needed).

`lvpnet-archive serve` runs it as child processes, so compression never competes with the SCP
and the API for one interpreter's lock, and the service process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time

from service.catalog import leases
from service.config import Settings
from service.logs import configure_logging, fields
from worker import runtime
from worker.context import make_context
from worker.pipeline import WorkerContext, archive_instance

LOGGER = logging.getLogger(__name__)
IDLE_SECONDS = 0.25


def run(ctx: WorkerContext, stopping: threading.Event) -> None:
    failures = 0
    while not stopping.is_set():
        try:
            with ctx.session_factory() as session:
                waiting = leases.next_claimable(session, limit=1)
            if not waiting:
                stopping.wait(IDLE_SECONDS)
                continue
            archive_instance(ctx, waiting[0])
            failures = 0
        except Exception:
            failures += 1
            delay = min(60.0, 0.5 * 2**failures)
            LOGGER.warning("archive attempt failed; retrying", extra=fields(delay=delay), exc_info=True)
            stopping.wait(delay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.embedded")
    parser.add_argument("--settings-json", default="{}", help="settings overrides (what serve was given)")
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json))
    configure_logging(settings.log_level)
    runtime.load()
    ctx = make_context(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    LOGGER.info("embedded worker started", extra=fields(owner=ctx.owner))
    started = time.monotonic()
    run(ctx, stopping)
    LOGGER.info("embedded worker stopped", extra=fields(seconds=round(time.monotonic() - started, 1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
