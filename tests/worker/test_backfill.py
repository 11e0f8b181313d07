"""`lvpnet-archive backfill`: archived instances re-compressed with the current candidates, the old
object kept until the new one is verified and catalogued, resumable, damaged records reported and
left alone."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.catalog.tables import Instance
from service.cli import main
from service.config import Settings
from service.db import make_engine, make_session_factory, migrate
from service.ingest import Ingestor
from service.record import parse_record
from service.storage import open_store
from tests.archive_support import ct_dataset, database, part10_bytes
from worker.pipeline import WorkerContext, archive_instance, rebuild_file


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def _rows(settings: Settings) -> dict[int, Instance]:
    engine = make_engine(settings.resolved_database_url())
    try:
        with make_session_factory(engine)() as session:
            return {row.id: row for row in session.scalars(select(Instance))}
    finally:
        engine.dispose()


def _backfill(settings: Settings, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    code = main(
        ["backfill", "--data-dir", str(settings.data_dir), "--database-url", settings.database_url, "--json", *extra]
    )
    return code, json.loads(capsys.readouterr().out)


def test_backfill_recompresses_resumably_and_keeps_old_objects_until_verified(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(database_url)
    # Ingested the fast way: whole-file zstd only
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url, codec_candidates="zstd")
    factory = make_session_factory(make_engine(database_url))
    store = open_store(settings.resolved_storage_url(), settings)
    ingestor = Ingestor(settings, factory, store, lambda _id: None)
    ctx = WorkerContext(settings, factory, store, "worker")
    for seed in (50, 51, 52):
        source = tmp_path / f"in{seed}.dcm"
        source.write_bytes(part10_bytes(ct_dataset(96, 96, seed=seed)))
        result = ingestor.ingest_file(source, source="import")
        assert result.instance_id is not None
        assert archive_instance(ctx, result.instance_id) == "archived"
    before = _rows(settings)
    assert {r.codec for r in before.values()} == {"zstd"}
    assert all(r.encoder_set == "zstd;zstd19" for r in before.values())

    monkeypatch.setenv("ARCHIVE_CODEC_CANDIDATES", "jpegls,zstd")
    code, report = _backfill(settings, capsys, "--dry-run")
    assert code == 0 and report["targets"] == 3 and report["tried"] == 0
    assert _rows(settings)[1].object_key == before[1].object_key

    # Interrupted after one instance (--limit): that one is done, the others untouched
    code, report = _backfill(settings, capsys, "--limit", "1")
    assert code == 0
    assert (report["targets"], report["tried"], report["improved"]) == (1, 1, 1)
    assert report["encoder_set"] == "jpegls,zstd;zstd19"
    assert report["bytes_after"] < report["bytes_before"]
    after = _rows(settings)
    assert after[1].codec == "jpegls" and after[1].encoder_set == "jpegls,zstd;zstd19"
    assert after[1].stored_bytes == report["bytes_after"]
    assert not store.exists(before[1].object_key or "")  # the old object went after the switch
    assert after[2].object_key == before[2].object_key and after[2].encoder_set == "zstd;zstd19"

    # Resumed: the rest, then nothing left
    code, report = _backfill(settings, capsys)
    assert code == 0 and (report["targets"], report["improved"]) == (2, 2)
    code, report = _backfill(settings, capsys)
    assert code == 0 and report["targets"] == 0
    after = _rows(settings)
    for row in after.values():
        data = rebuild_file(parse_record(store.get_bytes(row.object_key or "")))
        assert hashlib.sha256(data).hexdigest() == row.original_sha256
        assert len(store.get_bytes(row.object_key or "")) == row.stored_bytes
    assert sorted(store.iter_keys("objects/")) == sorted(r.object_key for r in after.values())

    # A damaged record is reported, its row and object left as they are; the others go on
    damaged = after[2].object_key or ""
    store.put_bytes(damaged, store.get_bytes(damaged)[:-40])
    monkeypatch.setenv("ARCHIVE_CODEC_CANDIDATES", "jpegls,jxl-e7,zstd")
    code, report = _backfill(settings, capsys)
    assert code == 1
    assert [f["instance"] for f in report["failed"]] == [2]
    assert report["tried"] == 3 and report["improved"] + report["unchanged"] == 2
    final = _rows(settings)
    assert final[2].object_key == damaged and final[2].encoder_set == "jpegls,zstd;zstd19"
    assert store.exists(damaged)
    assert final[1].encoder_set == final[3].encoder_set == "jpegls,jxl-e7,zstd;zstd19"


def test_encoder_set_names_the_lvpnet_weights(tmp_path: Path) -> None:
    from lvpnet.zoo import ZOO
    from worker.pipeline import encoder_set

    default = ZOO.get(None)
    assert encoder_set(("zstd", "lvpnet", "jpegls"), 19) == (
        f"jpegls,lvpnet:{default.name}@{default.sha256[:16]},zstd;zstd19"
    )
