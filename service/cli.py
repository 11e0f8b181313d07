"""`lvpnet-archive`: serve (everything in one, embedded defaults), api, dicom, worker, migrate,
import, stats, keys, scrub, rebuild-catalog."""

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
import time
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
    from service.security import ensure_admin_password

    with runtime.session_factory() as session:
        generated = ensure_admin_password(session, settings.admin_password, settings.data_dir)
    if generated is not None:
        LOGGER.warning("dashboard admin password generated", extra=fields(file=str(generated)))
    tls = {}
    if settings.http_tls_cert and settings.http_tls_key:
        tls = {"ssl_certfile": str(settings.http_tls_cert), "ssl_keyfile": str(settings.http_tls_key)}
    config = uvicorn.Config(
        create_app(runtime),
        host=settings.host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        # SIGTERM: stop accepting, let requests in flight (a STOW-RS upload, a WADO-RS answer) end
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
        **tls,
    )
    # uvicorn restores the handler it found and raises SIGTERM again once it has stopped: with the
    # default handler that would end the process before the caller's clean-up (DICOM drain, workers)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    LOGGER.info("HTTP server stopped")


def _drain_scp(scp: Any, grace: float) -> None:
    """Stop accepting associations, let the open ones finish (a C-STORE in flight is answered)
    for up to `grace` seconds, then abort the rest: a sender whose C-STORE got no answer resends."""
    scp.shutdown()

    def open_associations() -> list[Any]:
        # A released association's thread may linger until its socket times out: not in use
        return [a for a in scp.active_associations if a.is_established]

    deadline = time.monotonic() + grace
    while open_associations() and time.monotonic() < deadline:
        time.sleep(0.05)
    remaining = open_associations()
    for association in remaining:
        association.abort()
    LOGGER.info("DICOM SCP stopped", extra=fields(aborted=len(remaining)))


def _refuse_exposure(settings: Settings) -> None:
    problems = settings.exposure_problems()
    if problems:
        for problem in problems:
            print(f"refusing to start: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _start_embedded_workers(settings: Settings) -> list[subprocess.Popen[bytes]]:
    # JSON mode: dicts (commitment_peers) and paths survive the trip
    overrides = json.dumps(settings.model_dump(mode="json", exclude_unset=True))
    return [
        subprocess.Popen([sys.executable, "-m", "worker.embedded", "--settings-json", overrides])
        for _ in range(settings.embedded_workers)
    ]


def _keep_workers_alive(settings: Settings, workers: list[subprocess.Popen[bytes]], stopping: threading.Event) -> None:
    """A dead embedded worker is replaced (its instance comes back to the queue when its lease
    runs out): otherwise `serve` would go on accepting and never archive again."""
    while not stopping.wait(2.0):
        for index, worker in enumerate(workers):
            if worker.poll() is not None and not stopping.is_set():
                LOGGER.warning("embedded worker died; starting another", extra=fields(returncode=worker.returncode))
                workers[index] = _start_embedded_workers(settings.model_copy(update={"embedded_workers": 1}))[0]


def _scheduled_scrub(settings: Settings, session_factory: Any, stopping: threading.Event) -> None:
    """Run `scrub --sample` as a child process (it decodes: torch stays out of this process) once
    `scrub_interval_seconds` have passed since the last scrub the catalog records (by any host,
    CLI runs included) or since this start, whichever is later."""
    from sqlalchemy import func, select

    from service.catalog.tables import ScrubRun

    interval = settings.scrub_interval_seconds
    started = time.time()
    while not stopping.wait(min(60.0, interval)):
        try:
            with session_factory() as session:
                last = session.scalar(select(func.max(ScrubRun.started_at)))
            last_seconds = last.timestamp() if last is not None else 0.0
            if time.time() < max(last_seconds, started) + interval:
                continue
            command = [sys.executable, "-m", "service.cli", "scrub", "--quiet", "--json"]
            command += ["--sample", str(settings.scrub_sample)]
            LOGGER.info("scheduled scrub started", extra=fields(sample=settings.scrub_sample))
            result = subprocess.run(command, capture_output=True, timeout=24 * 3600)
            try:
                report = json.loads(result.stdout)
            except ValueError:
                report = {}
            LOGGER.info(
                "scheduled scrub finished",
                extra=fields(
                    exit_code=result.returncode,
                    checked=report.get("checked"),
                    corrupt=report.get("corrupt"),
                    errors=report.get("errors"),
                ),
            )
        except Exception:
            LOGGER.warning("scheduled scrub failed", exc_info=True)
        started = time.time()  # a failed run is not retried at once


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.db import migrate
    from service.dicom.server import start_scp
    from service.queue import make_enqueue
    from service.runtime import Runtime
    from service.sweeper import Sweeper

    _refuse_exposure(settings)
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
        # Embedded workers poll the catalog and take expired leases themselves: re-enqueueing would
        # only rewrite every waiting row each sweep (bench/load.md, finding 1).  With a broker, a
        # lost message is re-sent.
        requeue=bool(settings.broker_url),
        incoming_dir=settings.incoming_dir,
        incoming_stale_seconds=settings.incoming_stale_seconds,
        store=runtime.store,
        staging_orphan_seconds=settings.staging_orphan_seconds,
    )
    sweeper.start()
    # With a broker, Celery workers (`lvpnet-archive worker`) do the compression instead
    workers = [] if settings.broker_url else _start_embedded_workers(settings)
    watchdog_stop = threading.Event()
    if settings.scrub_interval_seconds > 0:
        threading.Thread(
            target=_scheduled_scrub,
            args=(settings, runtime.session_factory, watchdog_stop),
            name="scheduled-scrub",
            daemon=True,
        ).start()
    if workers:
        threading.Thread(
            target=_keep_workers_alive, args=(settings, workers, watchdog_stop), name="worker-watchdog", daemon=True
        ).start()
    LOGGER.info(
        "archive serving",
        extra=fields(http_port=settings.http_port, dicom_port=settings.dicom_port, workers=len(workers)),
    )
    try:
        _run_http(settings, runtime)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it already handled: a normal stop
        pass
    finally:
        watchdog_stop.set()
        sweeper.stop()
        for worker in workers:  # they finish (or give back) the instance in hand meanwhile
            worker.send_signal(signal.SIGTERM)
        if scp is not None:
            _drain_scp(scp, settings.shutdown_grace_seconds)
        for worker in workers:
            try:
                worker.wait(timeout=settings.shutdown_grace_seconds + 15)
            except subprocess.TimeoutExpired:
                worker.kill()
        runtime.close()
        LOGGER.info("archive stopped")
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

    _refuse_exposure(settings)
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

    _refuse_exposure(settings)
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
            _drain_scp(scp, settings.shutdown_grace_seconds)
        runtime.close()
    return 0


def cmd_retention(settings: Settings, args: argparse.Namespace) -> int:
    """List the studies ARCHIVE_RETENTION_RULES says have expired; delete them with --apply."""
    from service.audit import Actor
    from service.audit import event as audit_event
    from service.catalog.admin import delete_entity
    from service.catalog.retention import RetentionRules, expired_studies
    from service.db import make_engine, make_session_factory
    from service.storage import open_store

    try:
        rules = RetentionRules.parse(settings.retention_rules)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    engine = make_engine(settings.resolved_database_url())
    factory = make_session_factory(engine)
    store = open_store(settings.resolved_storage_url(), settings)
    actor = Actor("retention", "system")
    try:
        with factory() as session:
            expired = expired_studies(session, rules)
        print(json.dumps({"expired_studies": len(expired), "applied": bool(args.apply)}))
        if not args.apply:
            return 0
        for uid in expired:
            with factory() as session:
                removed, orphans = delete_entity(session, "study", uid, actor.name, "retention rule")
                detail = f"retention rule ({settings.retention_rules}): {removed} instances"
                session.add(audit_event(actor, "delete", "retention", study=uid, detail=detail))
                session.commit()
            for key in orphans:
                store.delete(key)
        LOGGER.info("retention applied", extra=fields(studies=len(expired)))
    finally:
        engine.dispose()
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    """API keys: `create --role ROLE --name NAME` prints the key once; `list`; `revoke --name NAME`."""
    from sqlalchemy import select

    from service.catalog.tables import ApiKey
    from service.db import make_engine, make_session_factory
    from service.security import Role, create_key, revoke_key

    engine = make_engine(settings.resolved_database_url())
    try:
        with make_session_factory(engine)() as session:
            if args.action == "create":
                if not args.name or not args.role:
                    print("keys create needs --name and --role", file=sys.stderr)
                    return 2
                try:
                    key = create_key(session, args.name, Role(args.role))
                except ValueError as exc:
                    print(str(exc), file=sys.stderr)
                    return 2
                print(key)
            elif args.action == "revoke":
                if not revoke_key(session, args.name or ""):
                    print("no such active key", file=sys.stderr)
                    return 1
            else:
                for row in session.scalars(select(ApiKey).order_by(ApiKey.id)):
                    state = "revoked" if row.revoked_at else "active"
                    print(f"{row.name}\t{row.role}\t{row.prefix}...\t{state}\tcreated {row.created_at:%Y-%m-%d}")
    finally:
        engine.dispose()
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.broker_url:
        from worker import embedded

        return embedded.main(["--settings-json", json.dumps(_overrides(args), default=str)])
    from worker.celery_app import app

    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.host)

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


def _progress(quiet: bool, unit: str) -> Any:
    """A tqdm bar factory on a terminal (stderr), None otherwise."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return lambda total=None, desc=None: tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)


def cmd_scrub(settings: Settings, args: argparse.Namespace) -> int:
    """Re-read archived objects, check them (and rebuild all or a sample); exit 1 on corruption."""
    mode = "headers" if args.headers_only else "sample" if args.sample is not None else "full"
    if args.sample is not None and not 0.0 <= args.sample <= 1.0:
        print("--sample takes a fraction between 0 and 1", file=sys.stderr)
        return 2
    metrics_dir = settings.data_dir / "metrics"
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") and metrics_dir.is_dir():
        # A `serve` on this host merges that directory into its /metrics: the scrub's failures show
        # there.  Set before prometheus-client is imported (it picks its value class at import).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    from service.db import make_engine, make_session_factory
    from service.storage import open_store
    from worker.scrub import scrub

    engine = make_engine(settings.resolved_database_url())
    bar = _progress(args.quiet, "instance")
    try:
        report = scrub(
            make_session_factory(engine),
            open_store(settings.resolved_storage_url(), settings),
            mode=mode,
            sample=args.sample if args.sample is not None else 1.0,
            seed=args.seed,
            progress=(lambda total: bar(total=total, desc="scrub")) if bar else None,
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print(
            f"scrub run {report.run_id} ({report.mode}): {report.checked} checked, {report.rebuilt} rebuilt, "
            f"{report.corrupt} corrupt ({report.missing} missing), {report.errors} unreadable now, "
            f"{report.unreferenced_objects} unreferenced objects, {report.seconds:.1f} s"
        )
        for finding in report.findings:
            print(f"  corrupt: instance {finding.instance_id} [{finding.check}] {finding.reason}")
    return report.exit_code


def cmd_rebuild_catalog(settings: Settings, args: argparse.Namespace) -> int:
    """Catalogue every record under objects/ and every staged file (resumable); exit 1 if any
    could not be read."""
    from service.db import make_engine, make_session_factory, migrate
    from service.storage import open_store
    from worker.rebuild_catalog import rebuild_catalog

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url())
    engine = make_engine(settings.resolved_database_url())
    bar = _progress(args.quiet, "object")
    try:
        report = rebuild_catalog(
            make_session_factory(engine),
            open_store(settings.resolved_storage_url(), settings),
            decode=not args.no_decode,
            progress=(lambda desc: bar(desc=desc)) if bar else None,
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        summary = {k: v for k, v in report.to_dict().items() if k != "problems"}
        print(" ".join(f"{k}={v}" for k, v in summary.items()))
        for problem in report.problems:
            print(f"  {problem['kind']}: {problem['key']}: {problem['reason']}")
    return report.exit_code


def cmd_backfill(settings: Settings, args: argparse.Namespace) -> int:
    """Re-compress archived instances with the current candidates (ARCHIVE_COMPRESSION_EFFORT,
    ARCHIVE_CODEC_CANDIDATES, the default LVPNet model); resumable; exit 1 if any failed."""
    from service.db import make_engine, make_session_factory, migrate
    from service.storage import open_store
    from worker import runtime
    from worker.backfill import backfill

    if args.limit is not None and args.limit < 0:
        print("--limit must not be negative", file=sys.stderr)
        return 2
    migrate(settings.resolved_database_url())
    runtime.load()
    engine = make_engine(settings.resolved_database_url())
    bar = _progress(args.quiet, "instance")
    try:
        report = backfill(
            settings,
            make_session_factory(engine),
            open_store(settings.resolved_storage_url(), settings),
            codec=args.codec,
            limit=args.limit,
            dry_run=args.dry_run,
            progress=(lambda total: bar(total=total, desc="backfill")) if bar else None,
        )
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        saved = report.bytes_before - report.bytes_after
        print(
            f"backfill ({report.encoder_set}): {report.targets} to do, {report.tried} tried, "
            f"{report.improved} smaller, {report.unchanged} unchanged, {report.changed_meanwhile} changed meanwhile, "
            f"{len(report.failed)} failed, {saved} bytes saved, {report.seconds:.1f} s"
        )
        for failure in report.failed:
            print(f"  failed: instance {failure['instance']}: {failure['error']}")
    return report.exit_code


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
        "retention": (cmd_retention, "list (or --apply: delete) studies past ARCHIVE_RETENTION_RULES"),
        "keys": (cmd_keys, "API keys: create --role reader|uploader|admin --name NAME (prints it once), list, revoke"),
        "scrub": (cmd_scrub, "re-read archived objects, check them, mark corrupt ones (exit 1 if any)"),
        "rebuild-catalog": (cmd_rebuild_catalog, "rebuild a lost catalog from the object store (resumable)"),
        "backfill": (cmd_backfill, "re-compress archived instances with the current model and codecs (resumable)"),
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
        if name == "retention":
            command.add_argument("--apply", action="store_true", help="delete them (default: only count)")
        if name == "keys":
            command.add_argument("action", choices=["create", "list", "revoke"])
            command.add_argument("--name")
            command.add_argument("--role", choices=["reader", "uploader", "admin"])
        if name == "scrub":
            which = command.add_mutually_exclusive_group()
            which.add_argument("--all", action="store_true", help="rebuild every archived instance (the default)")
            which.add_argument("--sample", type=float, metavar="FRACTION", help="rebuild a random fraction")
            which.add_argument("--headers-only", action="store_true", help="structure and checksums only, no decode")
            command.add_argument("--seed", type=int, default=None, help="seed of the --sample choice")
            command.add_argument("--json", action="store_true")
            command.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "rebuild-catalog":
            command.add_argument(
                "--no-decode",
                action="store_true",
                help="attributes from the non-pixel bytes only: faster, unverified, dataset SHA-256 left empty",
            )
            command.add_argument("--json", action="store_true")
            command.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "backfill":
            command.add_argument("--codec", help="only instances stored with this codec (e.g. file-zstd, jpegls)")
            command.add_argument("--limit", type=int, help="at most this many instances this run")
            command.add_argument("--dry-run", action="store_true", help="only count what would be tried")
            command.add_argument("--json", action="store_true")
            command.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "worker":
            command.add_argument("--concurrency", type=int, default=1)
            # A solo worker runs one task at a time: a fleet keeps some workers on `retrieve` only,
            # so that a retrieval never waits behind a long compression
            command.add_argument("--queues", default="archive,retrieve", help="Celery queues to consume")
    return parser


def _multiprocess_metrics(settings: Settings) -> None:
    """`serve` runs workers as child processes: their counters and histograms reach /metrics through
    prometheus-client's multiprocess mode (one file per process in a directory set before import)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = settings.data_dir / "metrics"
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # left by an earlier run: their values are not this run's
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory.resolve())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = _settings(args)
    configure_logging(settings.log_level)
    if args.handler is cmd_serve:
        _multiprocess_metrics(settings)
    return int(args.handler(settings, args))


if __name__ == "__main__":
    raise SystemExit(main())
