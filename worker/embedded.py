"""The embedded worker: polls the catalog for received instances (no broker needed).

`lvpnet-archive serve` runs it as child processes, so compression never competes with the SCP
and the API for one interpreter's lock, and the service process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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


class InHand:
    """The instance the worker is compressing now, for the shutdown watchdog."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instance_id: int | None = None


def run(ctx: WorkerContext, stopping: threading.Event, in_hand: InHand | None = None) -> None:
    failures = 0
    in_hand = in_hand or InHand()
    while not stopping.is_set():
        try:
            with ctx.session_factory() as session:
                waiting = leases.next_claimable(session, limit=1)
            if not waiting:
                stopping.wait(IDLE_SECONDS)
                continue
            with in_hand.lock:
                in_hand.instance_id = waiting[0]
            try:
                archive_instance(ctx, waiting[0])
            finally:
                with in_hand.lock:
                    in_hand.instance_id = None
            failures = 0
        except Exception:
            failures += 1
            delay = min(60.0, 0.5 * 2**failures)
            LOGGER.warning("archive attempt failed; retrying", extra=fields(delay=delay), exc_info=True)
            stopping.wait(delay)


def _give_back_at_deadline(ctx: WorkerContext, stopping: threading.Event, in_hand: InHand, grace: float) -> None:
    """After SIGTERM the instance in hand may finish for `grace` seconds; then its lease is
    released (state back to received, claimable at once) and the process exits, so a restart does
    not wait for the lease to expire.  Its staged original is untouched: nothing is lost."""
    stopping.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with in_hand.lock:
            if in_hand.instance_id is None:
                return  # the main loop sees `stopping` and ends by itself
        time.sleep(0.05)
    with in_hand.lock:
        instance_id = in_hand.instance_id
        if instance_id is None:
            return
        # Holding the lock keeps the main loop from starting anything else meanwhile
        try:
            with ctx.session_factory() as session:
                leases.release(session, instance_id, ctx.owner)
            LOGGER.warning("shutdown: compression cut off, instance given back", extra=fields(instance=instance_id))
        except Exception:  # the lease then expires as after a crash
            LOGGER.warning("shutdown: could not give the instance back", exc_info=True)
        logging.shutdown()
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.embedded")
    parser.add_argument("--settings-json", default="{}", help="settings overrides (what serve was given)")
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json))
    configure_logging(settings.log_level)
    runtime.load()
    ctx = make_context(settings)
    stopping = threading.Event()
    in_hand = InHand()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    threading.Thread(
        target=_give_back_at_deadline,
        args=(ctx, stopping, in_hand, settings.shutdown_grace_seconds),
        name="shutdown-watchdog",
        daemon=True,
    ).start()
    LOGGER.info("embedded worker started", extra=fields(owner=ctx.owner))
    started = time.monotonic()
    run(ctx, stopping, in_hand)
    LOGGER.info("embedded worker stopped", extra=fields(seconds=round(time.monotonic() - started, 1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
