"""A seeded mutation fuzzer run in a child process: one input at a time, each with a time limit,
the child's peak RSS measured, a hang or a crash of the child recorded (and the child restarted).

Targets:
* "codec": `lvpnet.decompress` on damaged `.lvp` streams (default model and the faithful
  `lvpnet-single-untrained-seed0`).  Outcomes: an `lvpnet.errors` exception, or exactly the
  original array; anything else (another exception type, other pixels) is a failure.
* "record": `parse_record` + `rebuild_file` on damaged archive records of every pixel codec and
  of whole files.  Any exception is a clean refusal (callers treat every one as corruption); a
  returned file is either the original or is caught by the SHA-256 comparison every caller makes.

Mutations are functions of (seed, index), so a failure is reproduced by its index.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------ memory


def _status(field_name: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


# ------------------------------------------------------------------------------ generic mutations


def flip_bits(data: bytes, rng: random.Random, count: int | None = None) -> bytes:
    damaged = bytearray(data)
    for _ in range(count or rng.randint(1, 4)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def splice(data: bytes, rng: random.Random) -> bytes:
    start = rng.randrange(len(data))
    how = rng.choice(["overwrite", "insert", "delete", "duplicate"])
    n = rng.randint(1, 16)
    junk = bytes(rng.randrange(256) for _ in range(n))
    if how == "overwrite":
        return data[:start] + junk + data[start + n :]
    if how == "insert":
        return data[:start] + junk + data[start:]
    if how == "delete":
        return data[:start] + data[start + n :]
    return data[:start] + data[start : start + 64] + data[start:]


# ------------------------------------------------------------------------------ codec target


def _images() -> list[tuple[np.ndarray, dict[str, Any]]]:
    rng = np.random.default_rng(1234)
    y, x = np.mgrid[0:40, 0:48]
    smooth = 1500 + 600 * np.sin(x / 6.0) * np.cos(y / 9.0)
    mono = np.stack([smooth + rng.integers(0, 24, (40, 48)), smooth[::-1] + rng.integers(0, 24, (40, 48))])
    yy, xx = np.mgrid[0:24, 0:20]
    rgb = np.stack([xx * 6, yy * 9, (xx + yy) * 4], axis=-1) + rng.integers(0, 10, (24, 20, 3))
    signed = (smooth[:32, :40] - 1800 + rng.integers(0, 24, (32, 40))).astype(np.int16)
    return [
        (mono.astype(np.uint16), {"bits_stored": 12, "color": "MONOCHROME", "tile_size": 32}),
        (rgb.clip(0, 255).astype(np.uint8), {"bits_stored": 8, "color": "RGB"}),
        (signed, {"bits_stored": 16, "color": "MONOCHROME", "tile_size": 16}),
    ]


CODEC_MODELS = (None, "lvpnet-single-untrained-seed0")
# Mutations that forge a header with a valid CRC (not damage a CRC would catch)
FORGED_HEADER = ("header-field", "header-byte-crc", "cross")


def _canonical(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


class CodecTarget:
    name = "codec"

    def __init__(self, images: int) -> None:
        from lvpnet import compress
        from lvpnet.codec import CodecOptions, stream_stats

        self.bases: list[tuple[bytes, np.ndarray]] = []
        for model in CODEC_MODELS:
            for image, kwargs in _images()[:images]:
                # raw_fallback=False: the model codes every varying plane, so its decoder is fuzzed too
                stream = compress(image, model=model, options=CodecOptions(raw_fallback=False), **kwargs)
                self.bases.append((stream, image))
        # The per-tile choice: streams whose planes are JPEG-LS / JPEG XL codestreams (format 2)
        for image, kwargs in _images()[:images]:
            for classical in (("jpegls",), ("jpegxl",)):
                options = CodecOptions(classical_planes=classical)
                stream = compress(image, model=CODEC_MODELS[0], options=options, **kwargs)
                if any(stream_stats(stream)[f"planes_{name}"] for name in classical):
                    self.bases.append((stream, image))

    def check(self, data: bytes, base: int) -> tuple[str, str]:
        from lvpnet import decompress
        from lvpnet.errors import LVPNetError

        try:
            out = decompress(data)
        except LVPNetError as exc:
            return "error", type(exc).__name__
        except Exception as exc:  # not a codec error: a failure of the contract
            return "foreign", f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:200]}"
        image = self.bases[base][1]
        if out.dtype == image.dtype and out.shape == image.shape and np.array_equal(out, image):
            return "exact", ""
        if out.dtype.itemsize == image.dtype.itemsize and _canonical(out) == _canonical(image):
            # The same samples, bit for bit, under another shape or signedness: what a header
            # forged with a valid CRC can do, since the SHA-256s cover the sample bytes only
            return "reinterpreted", f"{image.dtype}{image.shape} -> {out.dtype}{out.shape}"
        return "wrong", f"{out.dtype}{out.shape}"

    def mutate(self, rng: random.Random) -> tuple[str, bytes, int]:
        base = rng.randrange(len(self.bases))
        data = self.bases[base][0]
        kind = rng.choices(
            ["flip", "truncate", "splice", "header-field", "header-byte-crc", "payload-crc", "chunk-swap", "cross"],
            weights=[20, 10, 10, 15, 15, 20, 5, 5],
        )[0]
        if kind == "flip":
            return kind, flip_bits(data, rng), base
        if kind == "truncate":
            return kind, truncate(data, rng), base
        if kind == "splice":
            return kind, splice(data, rng), base
        if kind == "header-field":
            return kind, _header_field(data, rng), base
        if kind == "header-byte-crc":
            return kind, _header_byte_with_crc(data, rng), base
        if kind == "payload-crc":
            return kind, _payload_with_crc(data, rng), base
        if kind == "chunk-swap":
            return kind, _chunk_swap(data, rng), base
        other = self.bases[rng.randrange(len(self.bases))][0]
        return kind, _cross(data, other), base


def _with_header(data: bytes, header: Any, payload: bytes | None = None) -> bytes:
    from lvpnet.spec.container import pack_header

    if payload is None:
        payload = data[header.header_length :]
    return pack_header(header) + payload


def _header_field(data: bytes, rng: random.Random) -> bytes:
    """A header field changed and the header re-packed with a valid CRC (a crafted stream)."""
    from lvpnet.spec.container import Chunk, parse_header

    header = parse_header(data)
    d = header.descriptor
    field_name = rng.choice(
        [
            "rows",
            "cols",
            "frames",
            "samples",
            "dtype",
            "bits_stored",
            "color",
            "layout",
            "tile_size",
            "codec_id",
            "coder_version",
            "weights",
            "raw_sha",
            "frame_sha",
            "chunk_length",
            "chunk_crc",
        ]
    )
    small = rng.choice([0, 1, 2, 3, 7, 8, 9, 255, 256, 65535, 1 << 20, (1 << 32) - 1])
    try:
        if field_name in ("rows", "cols", "frames", "samples", "bits_stored", "tile_size"):
            value = rng.choice([getattr(d, field_name) + rng.choice([-1, 1]), small])
            return _with_header(data, replace(header, descriptor=replace(d, **{field_name: value})))
        if field_name in ("dtype", "color", "layout"):
            enum = type(getattr(d, field_name))
            value = enum(rng.choice([m.value for m in enum]))
            return _with_header(data, replace(header, descriptor=replace(d, **{field_name: value})))
        if field_name == "codec_id":
            value = rng.choice(["lvpnet-ctx", "lvpnet-dataset", "lvpnet-single-untrained-seed0", "", "x" * 300])
            return _with_header(data, replace(header, codec_id=value))
        if field_name == "coder_version":
            return _with_header(data, replace(header, coder_version=header.coder_version + "x"))
        if field_name == "weights":
            return _with_header(data, replace(header, weights_sha256=bytes(rng.randrange(256) for _ in range(32))))
        if field_name == "raw_sha":
            return _with_header(data, replace(header, raw_sha256=bytes(32)))
        if field_name == "frame_sha":
            shas = list(header.frame_sha256)
            shas[rng.randrange(len(shas))] = bytes(32)
            return _with_header(data, replace(header, frame_sha256=shas))
        chunks = list(header.chunks)
        i = rng.randrange(len(chunks))
        c = chunks[i]
        if field_name == "chunk_length":
            chunks[i] = Chunk(c.offset, max(0, c.length + rng.choice([-3, -1, 1, 5])), c.crc32)
        else:
            chunks[i] = Chunk(c.offset, c.length, c.crc32 ^ (1 << rng.randrange(32)))
        return _with_header(data, replace(header, chunks=chunks))
    except (ValueError, OverflowError, ZeroDivisionError, struct.error):
        # The writer refuses an inconsistent table: patch a raw descriptor byte and fix the CRC instead
        return _header_byte_with_crc(data, rng)


def _header_byte_with_crc(data: bytes, rng: random.Random) -> bytes:
    """Any header byte changed, the header CRC recomputed: only the parser's checks stand in the way."""
    (total,) = struct.unpack_from("<I", data, 12)
    damaged = bytearray(data)
    position = rng.randrange(8, total - 4)  # past the magic
    damaged[position] = rng.randrange(256) if rng.random() < 0.5 else damaged[position] ^ (1 << rng.randrange(8))
    struct.pack_into("<I", damaged, total - 4, zlib.crc32(bytes(damaged[: total - 4])))
    return bytes(damaged)


def _payload_with_crc(data: bytes, rng: random.Random) -> bytes:
    """Chunk payload damaged and its CRC fixed: the entropy decoder, the model and the SHA-256 checks
    are what must catch it."""
    from lvpnet.spec.container import Chunk, parse_header

    header = parse_header(data)
    payload = bytearray(data[header.header_length :])
    candidates = [i for i, c in enumerate(header.chunks) if c.length > 0]
    i = rng.choice(candidates)
    c = header.chunks[i]
    for _ in range(rng.randint(1, 3)):
        position = c.offset + rng.randrange(c.length)
        payload[position] ^= 1 << rng.randrange(8)
    chunks = list(header.chunks)
    chunks[i] = Chunk(c.offset, c.length, zlib.crc32(bytes(payload[c.offset : c.offset + c.length])))
    return _with_header(data, replace(header, chunks=chunks), bytes(payload))


def _chunk_swap(data: bytes, rng: random.Random) -> bytes:
    """Two tiles' chunks exchanged, table and CRCs consistent."""
    from lvpnet.spec.container import Chunk, parse_header

    header = parse_header(data)
    payload = data[header.header_length :]
    bodies = [payload[c.offset : c.offset + c.length] for c in header.chunks]
    if len(bodies) < 2:
        return _payload_with_crc(data, rng)
    i, j = rng.sample(range(len(bodies)), 2)
    bodies[i], bodies[j] = bodies[j], bodies[i]
    chunks, offset = [], 0
    for body in bodies:
        chunks.append(Chunk(offset, len(body), zlib.crc32(body)))
        offset += len(body)
    return _with_header(data, replace(header, chunks=chunks), b"".join(bodies))


def _cross(data: bytes, other: bytes) -> bytes:
    """One stream's header with another's payload (table adjusted when the counts allow)."""
    from lvpnet.spec.container import parse_header

    header, donor = parse_header(data), parse_header(other)
    if len(header.chunks) != len(donor.chunks):
        return data[: header.header_length] + other[donor.header_length :]
    return _with_header(data, replace(header, chunks=donor.chunks), other[donor.header_length :])


# ------------------------------------------------------------------------------ record target


RECORD_CODECS = ("lvpnet", "jpegls", "jxl-e7", "zstd", "whole")


class RecordTarget:
    name = "record"

    def __init__(self, images: int) -> None:
        from tests.archive_support import ct_dataset, part10_bytes
        from tests.reliability.support import rgb_dataset, with_tail

        # Fixed UIDs: the same base records, so the same (seed, index) is the same input every run
        datasets = [with_tail(ct_dataset(48, 40, seed=11), seed=11), rgb_dataset(seed=5)]
        for n, ds in enumerate(datasets[: max(1, images)]):
            uid = f"1.2.826.0.1.3680043.8.498.9.{n}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, f"{uid}.1"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{uid}.1.1"
        self.bases: list[tuple[bytes, bytes, str]] = []  # record, original, codec
        for ds in datasets[: max(1, images)]:
            original = part10_bytes(ds)
            for codec in RECORD_CODECS:
                self.bases.append((_record_with(original, codec), original, codec))

    def check(self, data: bytes, base: int) -> tuple[str, str]:
        from service.record import parse_record
        from worker.pipeline import rebuild_file

        original = self.bases[base][1]
        try:
            out = rebuild_file(parse_record(data))
        except MemoryError:
            return "foreign", "MemoryError"
        except Exception as exc:
            return "error", type(exc).__name__
        if out == original:
            return "exact", ""
        # Other bytes: what every caller's SHA-256 comparison (retrieval, scrub, build) refuses
        assert hashlib.sha256(out).hexdigest() != hashlib.sha256(original).hexdigest()
        return "other-bytes-refused-by-sha256", ""

    def mutate(self, rng: random.Random) -> tuple[str, bytes, int]:
        from tests.reliability.support import section_spans

        base = rng.randrange(len(self.bases))
        data, _original, codec = self.bases[base]
        spans = section_spans(data)
        kind = rng.choices(
            ["flip", "truncate", "splice", "section-flip", "json-field", "section-swap"],
            weights=[20, 10, 10, 30, 20, 10],
        )[0]
        if kind == "flip":
            return f"{kind}", flip_bits(data, rng), base
        if kind == "truncate":
            return kind, truncate(data, rng), base
        if kind == "splice":
            return kind, splice(data, rng), base
        if kind == "section-flip":
            names = [n for n, (a, b) in spans.items() if b > a and n != "header"]
            name = rng.choice(names)
            a, b = spans[name]
            return (
                f"section-flip:{codec if name == 'pixels' else name}",
                data[:a] + flip_bits(data[a:b], rng) + data[b:],
                base,
            )
        if kind == "json-field":
            return kind, _json_field(data, rng), base
        other = self.bases[rng.randrange(len(self.bases))][0]
        return kind, _section_swap(data, other, rng), base


def _record_with(original: bytes, codec: str) -> bytes:
    """The record of `original` with this pixel codec (or kept whole), whatever the best-of would pick."""
    from service.record import Record, Section, pack_record, parse_record, smallest_bytes_section
    from worker.pipeline import rebuild_file, split_file
    from worker.pixelcodecs import PIXEL_CODECS

    sha = hashlib.sha256(original).hexdigest()
    if codec == "whole":
        record = Record("whole", sha, len(original), [smallest_bytes_section("file", original)])
    else:
        split = split_file(original)
        assert split is not None
        stream = PIXEL_CODECS[codec].encode(split.pixels, split.spec)
        sections = [
            smallest_bytes_section("head", split.head),
            Section("pixels", codec, stream),
            smallest_bytes_section("tail", split.tail),
        ]
        record = Record("split", sha, len(original), sections, split.spec)
    data = pack_record(record)
    assert rebuild_file(parse_record(data)) == original
    return data


def _json_field(data: bytes, rng: random.Random) -> bytes:
    """A header value changed, the record re-framed with a consistent header length."""
    (length,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + length])
    body = data[12 + length :]
    choice = rng.choice(["original_bytes", "original_sha256", "kind", "section", "pixels"])
    if choice == "original_bytes":
        header["original_bytes"] = rng.choice(
            [0, 1, header["original_bytes"] - 1, header["original_bytes"] + 1, 1 << 40]
        )
    elif choice == "original_sha256":
        header["original_sha256"] = "0" * 64
    elif choice == "kind":
        header["kind"] = {"split": "whole", "whole": "split"}[header["kind"]]
    elif choice == "section":
        entry = rng.choice(header["sections"])
        key = rng.choice(["codec", "length", "name"])
        entry[key] = {
            "codec": rng.choice(["identity", "zstd", "lvpnet", "jpegls", "jxl-e7", "bogus"]),
            "length": max(0, int(entry["length"]) + rng.choice([-1, 1, 7])),
            "name": rng.choice(["head", "pixels", "tail", "file"]),
        }[key]
    elif header["pixels"]:
        spec = header["pixels"]
        key = rng.choice(sorted(spec))
        value = spec[key]
        if isinstance(value, bool):
            spec[key] = not value
        elif isinstance(value, int):
            spec[key] = value + rng.choice([-1, 1])
        elif isinstance(value, list):
            spec[key] = [*value[:-1], value[-1] + 1] if value else [1]
        else:
            spec[key] = rng.choice(["uint8", "int16", "uint16", "RGB", "MONOCHROME1", "float32"])
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return data[:8] + struct.pack("<I", len(encoded)) + encoded + body


def _section_swap(data: bytes, other: bytes, rng: random.Random) -> bytes:
    """A section replaced by the same-named section of another record (lengths re-framed)."""
    from service.record import pack_record, parse_record

    record, donor = parse_record(data), parse_record(other)
    shared = [s.name for s in record.sections if any(d.name == s.name for d in donor.sections)]
    if not shared:
        return data[:12] + other[12:]
    name = rng.choice(shared)
    record.sections = [donor.section(name) if s.name == name else s for s in record.sections]
    return pack_record(record)


# ------------------------------------------------------------------------------ the campaign


TARGETS: dict[str, Any] = {"codec": CodecTarget, "record": RecordTarget}


def _child(conn: Connection, target_name: str, images: int, seed: int) -> None:
    os.environ.setdefault("ARCHIVE_WORKER_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    target = TARGETS[target_name](images)
    for index in range(len(target.bases)):  # warm: models loaded, first-call costs paid
        assert target.check(target.bases[index][0], index)[0] == "exact"
    baseline = _status("VmRSS")
    _reset_peak()
    conn.send(("ready", len(target.bases), baseline))
    while True:
        message = conn.recv()
        if message is None:
            return
        rng = random.Random(f"{seed}:{message}")
        try:
            kind, data, base = target.mutate(rng)
        except Exception as exc:  # the fuzzer's own bug, reported as such (not the decoder's)
            conn.send(("?", "harness-error", repr(exc)[:200], 0.0, _status("VmHWM"), _status("VmRSS")))
            continue
        started = time.perf_counter()
        outcome, detail = target.check(data, base)
        seconds = time.perf_counter() - started
        conn.send((kind, outcome, detail, seconds, _status("VmHWM"), _status("VmRSS")))


@dataclass
class Campaign:
    target: str
    inputs: int
    seed: int
    per_input_limit_s: float
    outcomes: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # foreign, wrong, hang, crash
    hangs: int = 0
    crashes: int = 0
    max_seconds: float = 0.0
    total_decode_seconds: float = 0.0
    rss_baseline: int = 0
    rss_peak_growth: int = 0  # max over children of (peak RSS during the inputs - RSS before them)
    rss_final_growth: int = 0
    restarts: int = 0
    wall_seconds: float = 0.0
    bases: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "inputs": self.inputs,
            "seed": self.seed,
            "base_streams": self.bases,
            "outcomes": dict(self.outcomes),
            "by_mutation": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "hangs": self.hangs,
            "crashes": self.crashes,
            "failures": self.failures[:20],
            "max_input_seconds": round(self.max_seconds, 3),
            "mean_input_seconds": round(self.total_decode_seconds / max(1, self.inputs), 4),
            "per_input_limit_s": self.per_input_limit_s,
            "rss_baseline_mb": round(self.rss_baseline / 2**20, 1),
            "rss_peak_growth_mb": round(self.rss_peak_growth / 2**20, 1),
            "rss_final_growth_mb": round(self.rss_final_growth / 2**20, 1),
            "child_restarts": self.restarts,
            "wall_seconds": round(self.wall_seconds, 1),
        }


def run_campaign(target: str, inputs: int, *, seed: int = 0, images: int = 3, limit_s: float = 10.0) -> Campaign:
    context = multiprocessing.get_context("spawn")
    campaign = Campaign(target, inputs, seed, limit_s)
    started = time.monotonic()

    def start() -> tuple[Any, Connection, int]:
        parent, child = context.Pipe()
        process = context.Process(target=_child, args=(child, target, images, seed), daemon=True)
        process.start()
        child.close()
        if not parent.poll(600):
            process.kill()
            raise RuntimeError("fuzz child did not start")
        _ready, campaign.bases, baseline = parent.recv()
        return process, parent, baseline

    process, conn, baseline = start()
    campaign.rss_baseline = baseline
    for index in range(inputs):
        conn.send(index)
        if conn.poll(limit_s + 5):  # the margin covers the mutation itself and the pipe
            try:
                kind, outcome, detail, seconds, peak, rss = conn.recv()
            except EOFError:
                kind, outcome, detail, seconds = "?", "crash", f"exit code {process.join(5) or process.exitcode}", 0.0
        elif process.is_alive():
            kind, outcome, detail, seconds = "?", "hang", f"no answer in {limit_s + 5:g} s", limit_s
            process.kill()
        else:
            kind, outcome, detail, seconds = "?", "crash", f"exit code {process.exitcode}", 0.0
        if outcome in ("hang", "crash"):
            campaign.hangs += outcome == "hang"
            campaign.crashes += outcome == "crash"
            process.join(10)
            process, conn, baseline = start()
            campaign.restarts += 1
        else:
            campaign.rss_peak_growth = max(campaign.rss_peak_growth, peak - baseline)
            campaign.rss_final_growth = rss - baseline
            if seconds > limit_s:
                outcome, detail = "slow", f"{seconds:.1f} s"
        campaign.max_seconds = max(campaign.max_seconds, seconds)
        campaign.total_decode_seconds += seconds
        campaign.outcomes[outcome] += 1
        campaign.by_kind.setdefault(kind.split(":")[0] if kind != "?" else "?", Counter())[outcome] += 1
        if kind.startswith("section-flip:"):
            campaign.by_kind.setdefault(kind, Counter())[outcome] += 1
        if outcome in ("foreign", "wrong", "hang", "crash", "slow", "harness-error"):
            campaign.failures.append({"index": index, "mutation": kind, "outcome": outcome, "detail": detail})
    conn.send(None)
    process.join(30)
    if process.is_alive():
        process.kill()
    campaign.wall_seconds = time.monotonic() - started
    return campaign


def report(campaign: Campaign) -> dict[str, Any]:
    """The summary, also written to $FUZZ_REPORT_DIR/<target>.json when that is set."""
    summary = campaign.summary()
    directory = os.environ.get("FUZZ_REPORT_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{campaign.target}.json"), "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True)
    return summary
