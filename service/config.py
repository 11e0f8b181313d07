"""Settings from flags and ARCHIVE_* environment variables, with embedded defaults that need no server."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DuplicatePolicy(StrEnum):
    KEEP_FIRST = "keep-first"
    OVERWRITE = "overwrite"
    REJECT = "reject"


class CompressionEffort(StrEnum):
    # Every candidate (LVPNet, JPEG-LS, JPEG XL, zstd) at zstd level 19: the smallest verified record
    BEST = "best"
    # JPEG-LS and zstd level 3 only, about twenty times less CPU: for a backlog, or a test machine
    FAST = "fast"
    # BEST with LVPNet in single-image mode: the model is fine-tuned on each instance and its weight
    # delta kept in the stream when that makes it smaller (ARCHIVE_CODEC_ADAPT_STEPS steps, about
    # 0.1 s of CPU each: for archives where storage costs more than CPU)
    MAX = "max"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHIVE_", extra="ignore")

    data_dir: Path = Path("var")
    # Empty means "derive from data_dir": sqlite:///<data_dir>/catalog.sqlite3, file://<data_dir>/store
    database_url: str = ""
    storage_url: str = ""
    # Empty: the embedded queue (workers poll the catalog).  redis://... : Celery on Redis.
    broker_url: str = ""
    ae_title: str = "LVPARCHIVE"
    host: str = "127.0.0.1"
    http_port: int = 8080
    dicom_port: int = 11112
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    max_instance_bytes: int = Field(default=4 * 1024**3, ge=1024)
    # A worker that holds an instance longer than this without renewing has died: the sweeper
    # hands the instance to another worker.  Renewed every lease_seconds / 3 while working.
    lease_seconds: float = Field(default=120.0, gt=0)
    # On SIGTERM: how long in-flight work may take to finish (HTTP requests, DICOM associations, an
    # instance being compressed) before it is cut off; a cut-off compression gives its instance
    # back (lease released) so the next start takes it at once.  Keep below the orchestrator's
    # grace period (Kubernetes terminationGracePeriodSeconds, compose stop_grace_period).
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    sweep_interval_seconds: float = Field(default=30.0, gt=0)
    task_max_retries: int = 5
    compression_effort: CompressionEffort = CompressionEffort.BEST
    # Comma-separated pixel codecs to try instead of the effort's list (lvpnet, jpegls, jxl-e7, zstd),
    # e.g. "lvpnet" to measure the learned codec alone; the whole-file zstd record is always a candidate
    codec_candidates: str = ""
    # Fine-tuning steps of LVPNet's single-image mode under compression_effort "max"
    codec_adapt_steps: int = Field(default=100, ge=1, le=100_000)
    # Files in incoming_dir untouched this long are left over from a crash (a receive in progress
    # writes to its file with every P-DATA fragment; an association idle for network_timeout ends)
    incoming_stale_seconds: float = Field(default=3600.0, gt=0)
    # A staged copy that no catalog row names and whose bytes no archived instance holds (a crash
    # before the catalog commit, never resent) is removed after this long; until then
    # `rebuild-catalog` can still recover it should the catalog itself have been lost.
    # A copy whose bytes are archived under another row goes after incoming_stale_seconds.
    staging_orphan_seconds: float = Field(default=7 * 86400.0, gt=0)
    # Storage Commitment: calling AE title -> "host:port" of the peer that takes N-EVENT-REPORTs on
    # a new association, e.g. ARCHIVE_COMMITMENT_PEERS='{"PACS": "10.0.0.5:104"}'
    commitment_peers: dict[str, str] = Field(default_factory=dict)
    # Items not archived by then are reported as failed (0x0110): the PACS keeps its copies
    commitment_timeout_seconds: float = Field(default=3600.0, gt=0)
    commitment_poll_seconds: float = Field(default=0.5, gt=0)
    # S3 (storage_url s3://bucket/prefix)
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"
    # Retrieval: a WADO-RS request or a C-MOVE/C-GET sub-operation waits this long for a decode
    retrieve_timeout_s: float = Field(default=60.0, gt=0)
    # Verified rebuilt files kept in memory (LRU) by each API/SCP process
    retrieve_cache_bytes: int = Field(default=256 * 1024**2, ge=0)
    # Embedded mode: decode processes beside the API/SCP, and the threads each decode uses
    retrieve_workers: int = Field(default=1, ge=1)
    retrieve_threads: int = Field(default=2, ge=1)
    # C-MOVE destinations: "AE=host:port,AE2=host:port"
    dicom_peers: str = ""
    # Calling AEs allowed to store (C-STORE, Storage Commitment) and to query/retrieve (C-FIND,
    # C-MOVE, C-GET): "AE,AE@host,...", or "*".  Anyone else is rejected at association.  "*" is
    # accepted only while the SCP listens on loopback, unless dicom_allow_any_ae says otherwise.
    dicom_allowed_aes: str = "*"
    dicom_qr_allowed_aes: str = "*"
    dicom_allow_any_ae: bool = False
    # DICOM TLS (PS3.15 B.1): certificate and key of the SCP; with a CA file, clients must present a
    # certificate it signed (mutual TLS)
    dicom_tls_cert: Path | None = None
    dicom_tls_key: Path | None = None
    dicom_tls_ca: Path | None = None
    # HTTPS for the REST API
    http_tls_cert: Path | None = None
    http_tls_key: Path | None = None
    # REST authentication (API keys, dashboard session).  May be switched off only on loopback.
    require_auth: bool = True
    # The dashboard's admin password at first start; empty: one is generated into
    # <data_dir>/initial-admin-password
    admin_password: str = ""
    # Signs dashboard session cookies; several API hosts must share one (default: kept in data_dir)
    session_secret: str = ""
    # Back-pressure: refuse new objects (C-STORE 0xA700, STOW 503) while this many wait for
    # compression (0: no limit), or while the data disk has less than this free
    max_queue_depth: int = Field(default=0, ge=0)
    min_free_disk_bytes: int = Field(default=512 * 1024**2, ge=0)
    # Retention: "MODALITY:DAYS,...,*:DAYS" since the study date; 0 keeps forever (`lvpnet-archive retention`)
    retention_rules: str = ""
    # Celery worker: serve its Prometheus metrics on this port (0: off)
    worker_metrics_port: int = Field(default=0, ge=0, lt=65536)
    # Embedded worker: how many compression processes `serve` runs
    embedded_workers: int = Field(default=1, ge=0)
    # `serve` runs `scrub --sample <scrub_sample>` (every object re-read and checked, that fraction
    # rebuilt) this long after the last scrub run the catalog records, or after its own start
    # (0: never; distributed deployments schedule `lvpnet-archive scrub` instead, e.g. a CronJob)
    scrub_interval_seconds: float = Field(default=86400.0, ge=0)
    scrub_sample: float = Field(default=0.02, ge=0, le=1)
    log_level: str = "INFO"

    def exposure_problems(self) -> list[str]:
        """Settings that would expose the archive beyond this machine without protection."""
        from service.security import AllowList, is_loopback

        if is_loopback(self.host):
            return []
        problems = []
        if not self.require_auth:
            problems.append("ARCHIVE_REQUIRE_AUTH=false is allowed only on a loopback address")
        lists = (AllowList.parse(self.dicom_allowed_aes), AllowList.parse(self.dicom_qr_allowed_aes))
        if any(a.anyone for a in lists) and not self.dicom_allow_any_ae:
            problems.append(
                "ARCHIVE_DICOM_ALLOWED_AES / ARCHIVE_DICOM_QR_ALLOWED_AES is '*' on a non-loopback address: "
                "name the calling AEs, or set ARCHIVE_DICOM_ALLOW_ANY_AE=true to accept anyone"
            )
        return problems

    def peers(self) -> dict[str, tuple[str, int]]:
        """ARCHIVE_DICOM_PEERS parsed: AE title -> (host, port).  Raises ValueError when malformed."""
        peers: dict[str, tuple[str, int]] = {}
        for entry in filter(None, (part.strip() for part in self.dicom_peers.split(","))):
            title, _, address = entry.partition("=")
            host, _, port = address.rpartition(":")
            if not title.strip() or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"ARCHIVE_DICOM_PEERS entry {entry!r} is not AE=host:port")
            peers[title.strip()] = (host.strip("[]"), int(port))
        return peers

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.sqlite3').resolve()}"

    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return f"file://{(self.data_dir / 'store').resolve()}"

    @property
    def incoming_dir(self) -> Path:
        """Where the SCP's chunked receive writes partial objects: on the data disk, not /tmp."""
        return self.data_dir / "incoming"
