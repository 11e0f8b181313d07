"""Retrieval benchmark: WADO-RS instance latency (staging baseline, cold archived, warm cache),
study throughput, and C-MOVE of a study, through a real `lvpnet-archive serve` on this machine.

    .venv/bin/python bench/retrieve.py [--instances 24] [--codecs best,lvpnet,jxl-e7,jpegls]

Instances: 512x512 16-bit single-frame CT/MR images of the dev corpus (Explicit VR LE originals,
distinct SOP Instance UIDs), one study per run.  For each codec setting:
1. `serve` without compression workers: STOW the instances; GET each one twice: the baseline of an
   uncompressed file read from disk (staging) through the same endpoint, SHA-256 check included.
2. `serve` with workers and ARCHIVE_CODEC_CANDIDATES: archive them all.
3. A fresh `serve` (empty cache): GET each instance (cold: record read + decode on the decode
   worker + SHA-256), then again (warm: cache).  Then the whole study cold and warm, and a C-MOVE
   of the study to a pynetdicom Storage SCP (cold: a fresh `serve`).
Writes bench/retrieve.md and bench/retrieve.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.archive_support import free_port, part10_bytes, start_serve, stow  # noqa: E402

ANY = 'multipart/related; type="application/dicom"; transfer-syntax=*'
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def pick_images(corpus: Path, count: int) -> list[pydicom.Dataset]:
    """512x512 16-bit single-frame monochrome images, rewritten into one study (new UIDs: the same
    corpus file may be used by other runs)."""
    manifest = (corpus / "MANIFEST.tsv").read_text().splitlines()
    header = manifest[0].split("\t")
    chosen, seen = [], set()
    for line in manifest[1:]:
        row = dict(zip(header, line.split("\t"), strict=False))
        if (row["rows"], row["cols"], row["frames"], row["bits_allocated"], row["samples_per_pixel"]) != (
            "512",
            "512",
            "1",
            "16",
            "1",
        ):
            continue
        if row["pixel_md5_16"] in seen or row["modality"] not in ("CT", "MR"):
            continue
        seen.add(row["pixel_md5_16"])
        chosen.append(corpus / row["file"])
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    datasets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in chosen:
            ds = pydicom.dcmread(path)
            try:
                ds.decompress(generate_instance_uid=False)
            except Exception:
                continue
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = len(datasets) + 1
            try:
                part10_bytes(ds)
            except Exception:
                continue
            datasets.append(ds)
            if len(datasets) == count:
                break
    # Fewer distinct images than asked: repeat them as further instances (new UIDs, so each is
    # its own file, record and cache entry)
    distinct = list(datasets)
    while distinct and len(datasets) < count:
        copy = pydicom.dcmread(io.BytesIO(part10_bytes(distinct[len(datasets) % len(distinct)])))
        copy.SOPInstanceUID = pydicom.uid.generate_uid()
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        copy.InstanceNumber = len(datasets) + 1
        datasets.append(copy)
    return datasets


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def time_gets(urls: list[str]) -> list[float]:
    seconds = []
    with httpx.Client(timeout=120, headers={"Accept": ANY}) as client:
        for url in urls:
            started = time.perf_counter()
            response = client.get(url)
            response.raise_for_status()
            seconds.append(time.perf_counter() - started)
    return seconds


def summary(seconds: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "p95_ms": round(1000 * percentile(seconds, 0.95), 1),
        "n": len(seconds),
    }


def study_seconds(http: str, study: str) -> tuple[float, int]:
    started = time.perf_counter()
    with (
        httpx.Client(timeout=600) as client,
        client.stream("GET", f"{http}/dicomweb/studies/{study}", headers={"Accept": ANY}) as response,
    ):
        response.raise_for_status()
        size = sum(len(chunk) for chunk in response.iter_bytes())
    return time.perf_counter() - started, size


def c_move_seconds(dicom_port: int, scp_port: int, study: str, expected: int) -> float:
    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (
        CTImageStorage,
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelMove,
    )

    received = []
    receiver = AE(ae_title="BENCHSTORE")
    for sop_class in (CTImageStorage, MRImageStorage):
        receiver.add_supported_context(sop_class)
    server = receiver.start_server(
        ("127.0.0.1", scp_port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda event: received.append(event.request.AffectedSOPInstanceUID) or 0)],
    )
    try:
        mover = AE(ae_title="BENCHMOVE")
        mover.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = mover.associate("127.0.0.1", dicom_port, ae_title="LVPARCHIVE")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = study
        started = time.perf_counter()
        responses = list(assoc.send_c_move(identifier, "BENCHSTORE", StudyRootQueryRetrieveInformationModelMove))
        elapsed = time.perf_counter() - started
        assoc.release()
        final = responses[-1][0]
        assert final.Status == 0 and final.NumberOfCompletedSuboperations == expected, final
    finally:
        server.shutdown()
    return elapsed


def run_codec(work: Path, datasets: list[pydicom.Dataset], codec: str) -> dict[str, Any]:
    from tests.archive_support import database

    files = [part10_bytes(ds) for ds in datasets]
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    base = f"/dicomweb/studies/{study}/series/{series}/instances/"
    result: dict[str, Any] = {"codec_setting": codec}
    with database("sqlite", work) as url:
        data_dir = work / "var"
        staging = start_serve(work / "s1", url, data_dir=data_dir, embedded_workers=0)
        try:
            assert stow(staging.http, files).status_code == 200
            urls = [staging.http + base + ds.SOPInstanceUID for ds in datasets]
            time_gets(urls)  # page cache warm, like an archived object that was just read
            result["staging_from_disk"] = summary(time_gets(urls))
        finally:
            staging.stop()
        candidates = {} if codec == "best" else {"codec_candidates": codec}
        archiving = start_serve(work / "s2", url, data_dir=data_dir, embedded_workers=2, **candidates)
        try:
            rows = [archiving.wait_state(ds.SOPInstanceUID, {"archived"}, limit_seconds=1800) for ds in datasets]
        finally:
            archiving.stop()
        result["codecs_chosen"] = {c: sum(1 for r in rows if r["codec"] == c) for c in {r["codec"] for r in rows}}
        result["original_bytes"] = sum(r["original_bytes"] for r in rows)
        result["stored_bytes"] = sum(r["stored_bytes"] for r in rows)
        scp_port = free_port()
        serving = start_serve(
            work / "s3", url, data_dir=data_dir, embedded_workers=0, dicom_peers=f"BENCHSTORE=127.0.0.1:{scp_port}"
        )
        try:
            time.sleep(8)  # the decode worker loads the codec at start-up
            urls = [serving.http + base + ds.SOPInstanceUID for ds in datasets]
            result["archived_cold"] = summary(time_gets(urls))
            result["archived_warm_cache"] = summary(time_gets(urls))
            warm_seconds, size = study_seconds(serving.http, study)
            result["study_warm"] = {"seconds": round(warm_seconds, 3), "MB_per_s": round(size / warm_seconds / 1e6, 2)}
        finally:
            serving.stop()
        serving = start_serve(
            work / "s4", url, data_dir=data_dir, embedded_workers=0, dicom_peers=f"BENCHSTORE=127.0.0.1:{scp_port}"
        )
        try:
            time.sleep(8)
            cold_seconds, size = study_seconds(serving.http, study)
            result["study_cold"] = {"seconds": round(cold_seconds, 3), "MB_per_s": round(size / cold_seconds / 1e6, 2)}
            serving.stop()
            serving = start_serve(
                work / "s5", url, data_dir=data_dir, embedded_workers=0, dicom_peers=f"BENCHSTORE=127.0.0.1:{scp_port}"
            )
            time.sleep(8)
            move = c_move_seconds(serving.dicom_port, scp_port, study, len(datasets))
            result["c_move_cold"] = {"seconds": round(move, 3), "instances_per_s": round(len(datasets) / move, 2)}
        finally:
            serving.stop()
    return result


def write_report(results: list[dict[str, Any]], args: argparse.Namespace, instances: int) -> None:
    out = REPO / "bench"
    (out / "retrieve.json").write_text(json.dumps({"results": results, "instances": instances}, indent=2) + "\n")
    lines = [
        "# Retrieval benchmark",
        "",
        f"Command: `.venv/bin/python bench/retrieve.py --instances {args.instances} --codecs {args.codecs}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"python {platform.python_version()}; decode worker: 1 process x 2 threads (ARCHIVE_RETRIEVE_*)",
        "",
        f"{instances} single-frame 512x512 16-bit CT/MR instances (the distinct such images of the dev corpus, "
        "repeated under new UIDs up to that count; Explicit VR LE), one study. "
        "Latency = one WADO-RS instance GET (`transfer-syntax=*`, original bytes, SHA-256 checked by the "
        "archive), measured by the client, sequential requests.",
        "",
        "| codec setting | chosen | ratio | staging (disk) p50/p95 ms | archived cold p50/p95 ms | "
        "cache hit p50/p95 ms | study cold MB/s | study warm MB/s | C-MOVE cold inst/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(r["codecs_chosen"].items()))
        lines.append(
            f"| {r['codec_setting']} | {chosen} | {r['original_bytes'] / r['stored_bytes']:.3f} | "
            f"{r['staging_from_disk']['p50_ms']} / {r['staging_from_disk']['p95_ms']} | "
            f"{r['archived_cold']['p50_ms']} / {r['archived_cold']['p95_ms']} | "
            f"{r['archived_warm_cache']['p50_ms']} / {r['archived_warm_cache']['p95_ms']} | "
            f"{r['study_cold']['MB_per_s']} | {r['study_warm']['MB_per_s']} | {r['c_move_cold']['instances_per_s']} |"
        )
    lines += [
        "",
        "Goals (issue 5): a cache hit within 2x of serving an uncompressed file from disk through the same "
        "endpoint; a cold archived 512x512 16-bit instance p50 <= 150 ms on CPU with 2 threads.",
        "",
    ]
    (out / "retrieve.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/work/shared/corpus/dev"))
    parser.add_argument("--instances", type=int, default=24)
    parser.add_argument("--codecs", default="best,lvpnet,jxl-e7,jpegls")
    args = parser.parse_args(argv)
    datasets = pick_images(args.corpus, args.instances)
    print(f"{len(datasets)} instances", flush=True)
    results = []
    (REPO / "var").mkdir(exist_ok=True)
    for codec in args.codecs.split(","):
        with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
            # New UIDs per run: each run is its own study in its own catalog
            for ds in datasets:
                ds.SOPInstanceUID = pydicom.uid.generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            result = run_codec(Path(tmp), datasets, codec)
            print(json.dumps(result), flush=True)
            results.append(result)
    write_report(results, args, len(datasets))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
