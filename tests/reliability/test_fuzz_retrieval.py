"""Damaged records served through a running archive's WADO-RS: every answer is the original file
byte for byte or an error, never other bytes; no hang (10 s per request), the archive stays up,
its memory stays bounded, and it serves the repaired object again afterwards.

The record fuzzer's mutations (`tests/reliability/fuzzing.py`, every pixel codec and whole files,
flips, truncations, splices, header fields re-framed, sections swapped) are written over the
archived object of the instance; its catalog row is reset to `archived` before each request, as
the damage of one request marks it `corrupt`.  The retrieval cache is off, so every request
decodes.  RETRIEVAL_FUZZ_INPUTS (default 100) inputs in `make test`; `make soak` runs 1,000.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.archive_support import ArchiveProcess, parse_multipart, start_serve, stow
from tests.reliability.fuzzing import RECORD_CODECS, RecordTarget

INPUTS = int(os.environ.get("RETRIEVAL_FUZZ_INPUTS", "100"))
SEED = int(os.environ.get("FUZZ_SEED", "20260806"))
REPORT_DIR = os.environ.get("FUZZ_REPORT_DIR")
LIMIT_S = 10.0
RSS_LIMIT_MB = 200
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _tree_rss(pid: int) -> int:
    """VmRSS of a process and all its descendants, in bytes."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/status") as fh:
                total += next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:")), 0)
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        pending.extend(int(child) for child in children)
    return total


def _wado(archive: ArchiveProcess, uid: str) -> httpx.Response:
    url = f"{archive.http}/dicomweb/studies/{uid}/series/{uid}.1/instances/{uid}.1.1"
    return httpx.get(url, headers={"Accept": WADO_ACCEPT}, timeout=LIMIT_S + 20)


def test_damaged_records_are_never_served_as_the_original(tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'catalog.db'}"
    target = RecordTarget(images=2)
    archive = start_serve(tmp_path, sqlite_url, retrieve_cache_bytes=0, codec_candidates="zstd")
    engine = create_engine(sqlite_url)
    try:
        originals = {base // len(RECORD_CODECS): original for base, (_, original, _) in enumerate(target.bases)}
        uids = {n: f"1.2.826.0.1.3680043.8.498.9.{n}" for n in originals}
        assert stow(archive.http, list(originals.values())).status_code == 200
        keys = {}
        for n, uid in uids.items():
            row = archive.wait_state(f"{uid}.1.1", {"archived"}, limit_seconds=120)
            keys[n] = row["object_key"]
            assert parse_multipart(_wado(archive, uid))[0][1] == originals[n]
        assert archive.process is not None
        rss_start = _tree_rss(archive.process.pid)
        rss_peak = rss_start

        outcomes: Counter[str] = Counter()
        by_kind: dict[str, Counter[str]] = {}
        wrong: list[int] = []
        slowest = 0.0
        started = time.monotonic()
        for index in range(INPUTS):
            kind, data, base = target.mutate(random.Random(f"{SEED}:{index}"))
            n = base // len(RECORD_CODECS)
            (archive.data_dir / "store" / keys[n]).write_bytes(data)
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE instance SET state = 'archived', failure_reason = NULL WHERE object_key = :key"),
                    {"key": keys[n]},
                )
            began = time.monotonic()
            response = _wado(archive, uids[n])
            slowest = max(slowest, time.monotonic() - began)
            if response.status_code == 200:
                parts = parse_multipart(response)
                outcome = "exact" if len(parts) == 1 and parts[0][1] == originals[n] else "WRONG"
                if outcome == "WRONG":
                    wrong.append(index)
            else:
                # A clear error: JSON, and none of the instance's bytes
                assert response.headers["content-type"].startswith("application/json"), response.text[:200]
                outcome = f"HTTP {response.status_code}"
            outcomes[outcome] += 1
            by_kind.setdefault(kind, Counter())[outcome] += 1
            assert archive.process.poll() is None, archive.log()[-4000:]
            rss_peak = max(rss_peak, _tree_rss(archive.process.pid))
        seconds = time.monotonic() - started

        # Repaired: served again, byte for byte
        for n, uid in uids.items():
            record = target.bases[n * len(RECORD_CODECS) + RECORD_CODECS.index("zstd")][0]
            assert hashlib.sha256(record).hexdigest()  # the zstd record of this original, undamaged
            (archive.data_dir / "store" / keys[n]).write_bytes(record)
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE instance SET state = 'archived', failure_reason = NULL WHERE object_key = :key"),
                    {"key": keys[n]},
                )
            assert parse_multipart(_wado(archive, uid))[0][1] == originals[n]
        rss_end = _tree_rss(archive.process.pid)
    finally:
        engine.dispose()
        archive.stop()

    summary = {
        "inputs": INPUTS,
        "seed": SEED,
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "wrong_bytes_served": len(wrong),
        "max_seconds_per_request": round(slowest, 3),
        "wall_seconds": round(seconds, 1),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_peak_mb": round(rss_peak / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
    }
    print(json.dumps(summary, indent=2))
    if REPORT_DIR:
        Path(REPORT_DIR).mkdir(parents=True, exist_ok=True)
        (Path(REPORT_DIR) / f"retrieval-fuzz-{SEED}-{INPUTS}.json").write_text(json.dumps(summary, indent=2))
    assert wrong == [], summary
    assert sum(outcomes.values()) == INPUTS
    assert set(outcomes) <= {"exact", "HTTP 500"}, summary
    assert slowest <= LIMIT_S, summary
    assert (rss_peak - rss_start) / 2**20 <= RSS_LIMIT_MB, summary
