"""`lvpnet-archive`: serve (everything in one, embedded defaults), api, dicom, worker, migrate,
import, stats."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from service.config import Settings
from service.logs import configure_logging, fields

LOGGER = logging.getLogger("service.cli")

# flag -> settings field
OVERRIDES = {
    "data_dir": "--data-dir",
    "database_url": "--database-url",
    "storage_url": "--storage-url",
    "broker_url": "--broker-url",
    "ae_title": "--ae-title",
    "host": "--host",
    "http_port": "--http-port",
    "dicom_port": "--dicom-port",
}


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for field, flag in OVERRIDES.items():
        kind = int if field.endswith("_port") else str
        parser.add_argument(flag, dest=field, type=kind, default=None, help=f"overrides ARCHIVE_{field.upper()}")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, field) for field in OVERRIDES if getattr(args, field, None) is not None}


def _settings(args: argparse.Namespace) -> Settings:
    overrides = _overrides(args)
    # Exported too: child processes (embedded workers, Celery) read the same settings
    for field, value in overrides.items():
        os.environ[f"ARCHIVE_{field.upper()}"] = str(value)
    return Settings(**overrides)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from service.db import migrate

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url())
    LOGGER.info("catalog migrated")
    return 0


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from service.catalog.stats import compute_stats
    from service.db import make_engine, make_session_factory

    engine = make_engine(settings.resolved_database_url())
    with make_session_factory(engine)() as session:
        stats = compute_stats(session)
    engine.dispose()
    if args.json:
        print(stats.model_dump_json(indent=2))
    else:
        print(f"instances: {stats.instances}  by state: {stats.instances_by_state}")
        print(
            f"original bytes: {stats.original_bytes}  stored bytes: {stats.stored_bytes}  ratio: {stats.storage_ratio}"
        )
        for title, table in (("modality", stats.by_modality), ("codec", stats.by_codec)):
            for name, row in sorted(table.items()):
                print(f"  {title} {name}: {row.instances} instances, {row.original_bytes} -> {row.stored_bytes} bytes")
    return 0


def _run_http(settings: Settings, runtime: Any) -> None:
    import uvicorn

    from service.api.app import create_app

    config = uvicorn.Config(
        create_app(runtime), host=settings.host, port=settings.http_port, log_config=None, access_log=False
    )
    uvicorn.Server(config).run()


def _start_embedded_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    # JSON mode: dicts (commitment_peers) and paths survive the trip
    overrides = json.dumps(settings.model_dump(mode="json", exclude_unset=True))
    return [
        subprocess.Popen([sys.executable, "-m", "worker.embedded", "--settings-json", overrides])
        for _ in range(settings.embedded_workers)
    ]


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.db import migrate
    from service.dicom.server import start_scp
    from service.queue import make_enqueue
    from service.runtime import Runtime
    from service.sweeper import Sweeper

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url())
    runtime = Runtime.create(settings)
    runtime.retriever.start()
    scp = start_scp(settings, runtime.ingestor, runtime.retriever)
    sweeper = Sweeper(
        runtime.session_factory,
        make_enqueue(settings.broker_url),
        settings.lease_seconds,
        settings.sweep_interval_seconds,
        incoming_dir=settings.incoming_dir,
        incoming_stale_seconds=settings.incoming_stale_seconds,
    )
    sweeper.start()
    # With a broker, Celery workers (`lvpnet-archive worker`) do the compression instead
    workers = [] if settings.broker_url else _start_embedded_workers(settings)
    LOGGER.info(
        "archive serving",
        extra=fields(http_port=settings.http_port, dicom_port=settings.dicom_port, workers=len(workers)),
    )
    try:
        _run_http(settings, runtime)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it already handled: a normal stop
        pass
    finally:
        sweeper.stop()
        if scp is not None:
            scp.shutdown()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        runtime.close()
    return 0


def _incoming_cleaner(settings: Settings, runtime: Any) -> Any:
    """`api` and `dicom` receive into the incoming directory of their host: they clean it up (the
    Celery workers re-enqueue stuck instances)."""
    from service.sweeper import Sweeper

    sweeper = Sweeper(
        runtime.session_factory,
        runtime.ingestor.enqueue,
        settings.lease_seconds,
        settings.sweep_interval_seconds,
        requeue=False,
        incoming_dir=settings.incoming_dir,
        incoming_stale_seconds=settings.incoming_stale_seconds,
    )
    sweeper.start()
    return sweeper


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from service.runtime import Runtime

    runtime = Runtime.create(settings)
    runtime.retriever.start()
    sweeper = _incoming_cleaner(settings, runtime)
    try:
        _run_http(settings, runtime)
    except KeyboardInterrupt:
        pass
    finally:
        sweeper.stop()
        runtime.close()
    return 0


def cmd_dicom(settings: Settings, args: argparse.Namespace) -> int:
    from service.dicom.server import start_scp
    from service.runtime import Runtime

    runtime = Runtime.create(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    runtime.retriever.start()
    scp = start_scp(settings, runtime.ingestor, runtime.retriever)
    sweeper = _incoming_cleaner(settings, runtime)
    try:
        while not stopping.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sweeper.stop()
        if scp is not None:
            scp.shutdown()
        runtime.close()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.broker_url:
        from worker import embedded

        return embedded.main(["--settings-json", json.dumps(_overrides(args), default=str)])
    from worker.celery_app import app

    argv = ["worker", "--loglevel", settings.log_level, "--without-gossip", "--without-mingle", "--queues", args.queues]
    if args.concurrency > 1:
        argv += ["--pool", "prefork", "--concurrency", str(args.concurrency)]
    else:
        argv += ["--pool", "solo"]
    app.worker_main(argv=argv)
    return 0


def cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select
    from tqdm import tqdm

    from service.catalog.tables import ImportedFile
    from service.db import migrate
    from service.runtime import Runtime

    migrate(settings.resolved_database_url())
    runtime = Runtime.create(settings)
    root = Path(args.directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    counts: dict[str, int] = {}
    with tqdm(files, unit="file", disable=args.quiet, file=sys.stderr) as progress:
        for path in progress:
            stat = path.stat()
            key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
            with runtime.session_factory() as session:
                done = session.scalars(select(ImportedFile).where(ImportedFile.path_sha256 == key)).first()
                if done is not None and done.size == stat.st_size and done.mtime_ns == stat.st_mtime_ns:
                    counts["already-imported"] = counts.get("already-imported", 0) + 1
                    continue
            result = runtime.ingestor.ingest_file(path, source="import", move=False)
            outcome = str(result.status)
            counts[outcome] = counts.get(outcome, 0) + 1
            with runtime.session_factory() as session:
                row = session.scalars(select(ImportedFile).where(ImportedFile.path_sha256 == key)).first()
                if row is None:
                    row = ImportedFile(path_sha256=key, size=stat.st_size, mtime_ns=stat.st_mtime_ns, outcome=outcome)
                    session.add(row)
                row.size, row.mtime_ns, row.outcome = stat.st_size, stat.st_mtime_ns, outcome
                session.commit()
            progress.set_postfix(counts, refresh=False)
    runtime.close()
    print(json.dumps(counts, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvpnet-archive", description="LVPNet DICOM archive")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "serve": (cmd_serve, "REST + DICOM SCP + background worker in one process (embedded defaults)"),
        "api": (cmd_api, "REST API only"),
        "dicom": (cmd_dicom, "DICOM SCP only (several may share the port)"),
        "worker": (cmd_worker, "compression worker (Celery with a broker URL, else embedded)"),
        "migrate": (cmd_migrate, "apply catalog migrations"),
        "import": (cmd_import, "bulk-import a folder of DICOM files (resumable)"),
        "stats": (cmd_stats, "catalog figures"),
    }
    for name, (handler, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text)
        _add_settings_flags(command)
        command.set_defaults(handler=handler)
        if name == "stats":
            command.add_argument("--json", action="store_true")
        if name == "import":
            command.add_argument("directory", type=Path)
            command.add_argument("--quiet", action="store_true")
        if name == "worker":
            command.add_argument("--concurrency", type=int, default=1)
            # A solo worker runs one task at a time: a fleet keeps some workers on `retrieve` only,
            # so that a retrieval never waits behind a long compression
            command.add_argument("--queues", default="archive,retrieve", help="Celery queues to consume")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    configure_logging(settings.log_level)
    return int(args.handler(settings, args))


if __name__ == "__main__":
    raise SystemExit(main())
