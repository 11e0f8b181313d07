"""Prometheus metrics of this process (exposed at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INGESTED = Counter(
    "archive_ingested_total",
    "Objects received (C-STORE, STOW-RS, import), by source and outcome",
    ["source", "status"],
)
INGESTED_BYTES = Counter("archive_ingested_bytes_total", "Bytes of accepted objects", ["source"])
RETRIEVE_SECONDS = Histogram(
    "archive_retrieve_seconds",
    "Time to obtain a verified original file for retrieval, by where it came from",
    ["source"],  # cache | staging | archive
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
VERIFICATION_FAILURES = Counter(
    "archive_verification_failures_total",
    "Stored bytes that did not give the original back (instance marked corrupt)",
    ["stage"],  # retrieve | scrub
)
RETRIEVALS = Counter(
    "archive_retrievals_total",
    "Instances sent, by interface and outcome",
    ["interface", "outcome"],  # wado | c-move | c-get ; ok | corrupt | timeout | unavailable | not-acceptable
)
COMPRESSION_SECONDS = Histogram(
    "archive_compression_seconds",
    "Time to compress, verify and store one instance, by the codec chosen",
    ["codec"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STAGING_ORPHANS_REMOVED = Counter(
    "archive_staging_orphans_removed_total",
    "Staged copies no catalog row named (left by a crash before the catalog commit), removed",
    ["reason"],
)
ARCHIVED = Counter("archive_archived_total", "Instances archived, by codec chosen", ["codec"])
ARCHIVED_BYTES = Counter(
    "archive_archived_bytes_total", "Bytes of archived instances, by codec chosen", ["codec", "kind"]
)  # kind: original | stored
ARCHIVE_FAILURES = Counter("archive_archive_failures_total", "Instances that could not be archived")
