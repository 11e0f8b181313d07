"""`lvpnet bench`: LVPNet models against classical lossless codecs on the same frames.

Methodology follows the classical-codec reference report (shared/reference/classical-codecs-dev.md):
bpp = 8 * bytes / (rows * cols * samples) with every byte of every stream counted; aggregates are
totals (bytes-weighted: sum of bytes over sum of samples, never a mean of ratios); MB/s = raw
container MB (1e6 bytes, BitsAllocated bytes per sample) per second of wall time, here the median
of `repeat` runs per frame, summed over frames.  Every decode is compared with the input array
(dtype, shape and values); a mismatch is counted as a failure, never dropped.

Frames come from `iter_corpus_frames` (de-duplicated by pixel hash, also across roots) and are
grouped by modality: CT, MR, CR/DX (CR, DX, RG), US, MG, other (OT, SC, NM, PT, XA, none...).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

GROUPS: tuple[str, ...] = ("CT", "MR", "CR/DX", "US", "MG", "other")
OVERALL = "overall"
_GROUP_OF = {"CT": "CT", "MR": "MR", "CR": "CR/DX", "DX": "CR/DX", "RG": "CR/DX", "US": "US", "MG": "MG"}
# stream_stats keys; sum to len(data).  classical: planes coded as JPEG-LS / JPEG XL by the per-tile choice
SPLIT_PARTS = ("header", "adaptation", "z", "pixels", "raw", "classical", "plane_records")
PLANE_MODES = ("constant", "raw", "model", "jpegls", "jpegxl", "jpegxl_tile")
JXL = "jxl-e7"

T = TypeVar("T")

__all__ = ["GROUPS", "add_bench_parser", "modality_group", "run_bench", "write_chart", "write_markdown"]


def modality_group(modality: str | None) -> str:
    return _GROUP_OF.get((modality or "").strip().upper(), "other")


ADAPT_SUFFIX = "+adapt"


def model_spec(spec: str) -> tuple[str, int]:
    """A bench model name: a zoo name, or `NAME+adaptN` for single-image mode with N fine-tuning steps."""
    name, sep, steps = spec.partition(ADAPT_SUFFIX)
    if not sep:
        return spec, 0
    if not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"{spec!r}: expected NAME{ADAPT_SUFFIX}N with N >= 1 fine-tuning steps")
    return name, int(steps)


def _jpegls_reference(codecs: Sequence[str]) -> str | None:
    """The JPEG-LS the deltas compare with: the DICOM-style P = BitsStored one when available."""
    for name in ("jpegls-bs", "jpegls"):
        if name in codecs:
            return name
    return None


# ---------------------------------------------------------------------------------- machine


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    facts: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        # The machine may be shared: the load at the start puts the MB/s figures in context.
        facts["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return facts


def _library_versions() -> dict[str, str]:
    import torch

    from lvpnet.eval.classical import codec_versions

    return {"numpy": np.__version__, "torch": torch.__version__, **codec_versions()}


# ---------------------------------------------------------------------------------- frames


def _frames(
    roots: Sequence[Path], split: str, heldout: set[str] | None = None
) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Frames of the split, de-duplicated across roots too (iter_corpus_frames does it per root).
    `heldout`: the held-out series keys (default: the committed list)."""
    from lvpnet.imageio import iter_corpus_frames
    from lvpnet.train.data import load_heldout, series_key

    if split != "heldout":
        heldout = None
    elif heldout is None:
        heldout = load_heldout()
    seen: set[bytes] = set()
    for root in roots:
        for name, frame, info in iter_corpus_frames(Path(root)):
            key = series_key(name, info)
            if heldout is not None and key not in heldout:
                continue
            if len(roots) > 1:
                tag = repr((frame.shape, frame.dtype.str)).encode()
                digest = hashlib.sha1(frame.tobytes() + tag).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            label = f"{Path(root).name}/{name}" if len(roots) > 1 else name
            yield label, frame, {**info, "series": key}


def _timed(fn: Callable[[], T], repeat: int) -> tuple[T, float]:
    """fn's result and the median wall time of `repeat` runs."""
    times, result = [], None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)  # type: ignore[return-value]


def _same(decoded: np.ndarray, array: np.ndarray) -> bool:
    return decoded.dtype == array.dtype and decoded.shape == array.shape and np.array_equal(decoded, array)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------- per frame


def _lvpnet_row(
    array: np.ndarray, bits_stored: int, color: str, model: str, options: Any, repeat: int, samples: int
) -> dict[str, Any]:
    from lvpnet.codec import compress, decompress, stream_stats

    model, adapt_steps = model_spec(model)
    if adapt_steps:
        options = replace(options, adapt_steps=adapt_steps)
    row: dict[str, Any] = {"bytes": None, "exact": False, "error": None}
    try:
        data, row["encode_s"] = _timed(
            lambda: compress(array, bits_stored=bits_stored, color=color, model=model, options=options),
            repeat,
        )
    except Exception as exc:  # any failure to code a frame the reader accepted is a finding
        row["error"] = "encode: " + _error(exc)
        return row
    stats = stream_stats(data)
    split = {part: int(stats[part]) for part in SPLIT_PARTS}
    row.update(
        bytes=len(data),
        bpp=8 * len(data) / samples,
        split=split,
        split_bpp={part: 8 * n / samples for part, n in split.items()},
        split_complete=sum(split.values()) == len(data),
        planes={mode: int(stats[f"planes_{mode}"]) for mode in PLANE_MODES},
    )
    total_planes = sum(row["planes"].values())
    row["model_plane_fraction"] = row["planes"]["model"] / total_planes if total_planes else 0.0
    try:
        decoded, row["decode_s"] = _timed(lambda: decompress(data, options=options), repeat)
        row["exact"] = _same(decoded, array)
        if not row["exact"]:
            row["error"] = "decode: not bit-exact"
    except Exception as exc:
        row["error"] = "decode: " + _error(exc)
    return row


def _classical_row(codec: Any, array: np.ndarray, bits: int, repeat: int, samples: int) -> dict[str, Any]:
    try:
        data, encode_s = _timed(lambda: codec.encode(array, bits), repeat)
    except Exception as exc:  # the codec cannot take this frame: not covered, with the reason
        return {"covered": False, "lossless_failure": False, "reason": "encode: " + _error(exc)}
    try:
        decoded, decode_s = _timed(lambda: codec.decode(data), repeat)
    except Exception as exc:
        return {"covered": False, "lossless_failure": True, "reason": "decode: " + _error(exc)}
    if not _same(decoded, array):
        return {"covered": False, "lossless_failure": True, "reason": "decode: not bit-exact"}
    return {
        "covered": True,
        "bytes": len(data),
        "bpp": 8 * len(data) / samples,
        "encode_s": encode_s,
        "decode_s": decode_s,
    }


def _frame_row(
    name: str,
    array: np.ndarray,
    info: dict[str, Any],
    *,
    models: Sequence[str],
    codecs: dict[str, Any],
    options: Any,
    repeat: int,
    model_only: bool,
) -> dict[str, Any]:
    samples = int(array.size)
    bits_allocated = int(info.get("bits_allocated") or 8 * array.dtype.itemsize)
    bits_stored = int(info.get("bits_stored") or bits_allocated)
    color = str(info.get("color") or ("RGB" if array.ndim == 3 else "MONOCHROME"))
    row: dict[str, Any] = {
        "name": name,
        "group": modality_group(info.get("modality")),
        "modality": info.get("modality"),
        "series": info.get("series"),
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "bits_stored": bits_stored,
        "bits_allocated": bits_allocated,
        "color": color,
        "samples": samples,
        "raw_bytes": samples * ((bits_allocated + 7) // 8),
        "lvpnet": {},
        "classical": {},
    }
    for model in models:
        entry = _lvpnet_row(array, bits_stored, color, model, options, repeat, samples)
        if model_only and not model_spec(model)[1]:
            # The network on every plane (no raw or classical fallback): what the model achieves.  One
            # timed run (not the median) to keep the extra cost down.  Not for single-image mode,
            # whose fine-tuning would double the run's time.
            only = replace(options, raw_fallback=False)
            entry["model_only"] = _lvpnet_row(array, bits_stored, color, model, only, 1, samples)
        row["lvpnet"][model] = entry
    for codec_name, codec in codecs.items():
        row["classical"][codec_name] = _classical_row(codec, array, bits_stored, repeat, samples)
    return row


# ------------------------------------------------------------------------------ aggregates


def _mbps(raw_bytes: int, seconds: float) -> float | None:
    return raw_bytes / seconds / 1e6 if seconds > 0 else None


Pick = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def _picker(section: str, name: str, variant: str | None = None) -> Pick:
    """d[section][name] (or its `variant` entry), for frame rows and group aggregates alike."""

    def pick(d: dict[str, Any]) -> dict[str, Any] | None:
        entry: dict[str, Any] = d[section][name]
        return entry if variant is None else entry.get(variant)

    return pick


def _lvpnet_aggregate(rows: list[dict[str, Any]], pick: Pick) -> dict[str, Any]:
    entries = [(r, pick(r) or {}) for r in rows]
    coded = [(r, e) for r, e in entries if e.get("bytes") is not None]
    samples = sum(r["samples"] for r, _ in coded)
    total = sum(e["bytes"] for _, e in coded)
    split = {part: sum(e["split"][part] for _, e in coded) for part in SPLIT_PARTS}
    planes = {mode: sum(e["planes"][mode] for _, e in coded) for mode in PLANE_MODES}
    enc = [(r, e) for r, e in coded if "encode_s" in e]  # timed runs only
    dec = [(r, e) for r, e in coded if "decode_s" in e]
    return {
        "frames": len(rows),
        "frames_coded": len(coded),
        "complete": len(coded) == len(rows),
        "samples": samples,
        "bytes": total,
        "bpp": 8 * total / samples if samples else None,
        "split": split,
        "split_bpp": {part: (8 * n / samples if samples else None) for part, n in split.items()},
        "planes": planes,
        "model_plane_fraction": planes["model"] / sum(planes.values()) if sum(planes.values()) else None,
        "encode_mbps": _mbps(sum(r["raw_bytes"] for r, _ in enc), sum(e["encode_s"] for _, e in enc)),
        "decode_mbps": _mbps(sum(r["raw_bytes"] for r, _ in dec), sum(e["decode_s"] for _, e in dec)),
        "failures": sum(1 for _, e in entries if not e.get("exact")),
    }


def _classical_aggregate(rows: list[dict[str, Any]], codec: str) -> dict[str, Any]:
    covered = [r for r in rows if r["classical"][codec]["covered"]]
    samples = sum(r["samples"] for r in covered)
    raw = sum(r["raw_bytes"] for r in covered)
    total = sum(r["classical"][codec]["bytes"] for r in covered)
    return {
        "frames": len(rows),
        "frames_covered": len(covered),
        "complete": len(covered) == len(rows),
        "samples": samples,
        "bytes": total,
        "bpp": 8 * total / samples if samples else None,
        "encode_mbps": _mbps(raw, sum(r["classical"][codec]["encode_s"] for r in covered)),
        "decode_mbps": _mbps(raw, sum(r["classical"][codec]["decode_s"] for r in covered)),
        "failures": sum(1 for r in rows if r["classical"][codec].get("lossless_failure")),
    }


def _delta(rows: list[dict[str, Any]], model: str, codec: str) -> dict[str, Any]:
    """Model bytes vs codec bytes in %, over the frames both coded (the same frames on both sides)."""
    common = [r for r in rows if r["lvpnet"][model].get("bytes") is not None]
    common = [r for r in common if r["classical"][codec]["covered"]]
    ours = sum(r["lvpnet"][model]["bytes"] for r in common)
    theirs = sum(r["classical"][codec]["bytes"] for r in common)
    pct = 100.0 * (ours / theirs - 1.0) if theirs else None
    return {"codec": codec, "frames": len(common), "complete": len(common) == len(rows), "pct": pct}


def _aggregate(
    frames: list[dict[str, Any]], models: Sequence[str], codecs: Sequence[str], model_only: bool
) -> dict[str, Any]:
    groups: dict[str, Any] = {}
    jpegls = _jpegls_reference(codecs)
    for group in (*GROUPS, OVERALL):
        rows = [r for r in frames if group in (OVERALL, r["group"])]
        entry: dict[str, Any] = {
            "frames": len(rows),
            "samples": sum(r["samples"] for r in rows),
            "raw_bytes": sum(r["raw_bytes"] for r in rows),
            "lvpnet": {},
            "classical": {c: _classical_aggregate(rows, c) for c in codecs},
            "deltas": {},
        }
        for model in models:
            entry["lvpnet"][model] = _lvpnet_aggregate(rows, _picker("lvpnet", model))
            if model_only and not model_spec(model)[1]:
                only = _picker("lvpnet", model, "model_only")
                entry["lvpnet"][model]["model_only"] = _lvpnet_aggregate(rows, only)
            entry["deltas"][model] = {
                f"vs_{ref}": _delta(rows, model, ref) for ref in (JXL, jpegls) if ref and ref in codecs
            }
        groups[group] = entry
    return groups


# ------------------------------------------------------------------------------------- run


def run_bench(
    roots: Sequence[str | Path],
    *,
    models: Sequence[str] | None = None,
    split: str = "heldout",
    threads: int = 1,
    repeat: int = 3,
    limit: int | None = None,
    model_only: bool = True,
    codecs: Sequence[str] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Benchmark zoo models (default: the zoo's default) and the classical codecs on the frames of
    `roots` in `split` ("heldout": the committed held-out series; "all"), at most `limit` frames.

    LVPNet runs with CodecOptions(workers=threads) and `threads` torch threads; the classical
    codecs run single-threaded.  Times are medians of `repeat` runs.  `model_only` adds each
    model's figures with raw fallback off (one run).  Returns a JSON-ready dict; decode failures
    are counted in result["failures"], never raised.
    """
    import torch
    from tqdm import tqdm

    from lvpnet.codec import CodecOptions, compress
    from lvpnet.eval.classical import CLASSICAL_CODECS
    from lvpnet.zoo import ZOO

    if split not in ("heldout", "all"):
        raise ValueError(f"split must be 'heldout' or 'all', not {split!r}")
    model_names = list(models) if models else [ZOO.default_name()]
    wanted = list(codecs if codecs is not None else CLASSICAL_CODECS)
    codec_map = {name: CLASSICAL_CODECS[name] for name in wanted}
    root_paths = [Path(r) for r in roots]
    options = CodecOptions(workers=max(1, threads), raw_fallback=True)
    command = command or (
        f"run_bench({[str(r) for r in root_paths]!r}, models={model_names!r}, split={split!r}, "
        f"threads={threads}, repeat={repeat}, limit={limit!r}, model_only={model_only})"
    )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    started, clock = dt.datetime.now(dt.UTC), time.perf_counter()
    facts = machine_facts()  # load average before the bench adds its own
    try:
        warm = np.random.default_rng(0).integers(0, 4096, (32, 32)).astype(np.uint16)
        model_info = {}
        for model in model_names:
            name, adapt_steps = model_spec(model)
            bundle = ZOO.get(name)  # unknown names fail here, before any timing
            model_info[model] = {"sha256": bundle.sha256, "adapt_steps": adapt_steps}
            # Weights loading and torch start-up must not land in the first frame's timing.
            compress(warm, model=name, options=replace(options, raw_fallback=False))
        frames: list[dict[str, Any]] = []
        stream = itertools.islice(_frames(root_paths, split), limit)  # stop reading at the limit
        with tqdm(total=limit, unit="frame", desc="bench", disable=not progress) as bar:
            for name, array, info in stream:
                bar.set_postfix_str(name[-40:], refresh=False)
                frames.append(
                    _frame_row(
                        name,
                        array,
                        info,
                        models=model_names,
                        codecs=codec_map,
                        options=options,
                        repeat=repeat,
                        model_only=model_only,
                    )
                )
                bar.update()
    finally:
        torch.set_num_threads(previous_threads)

    failures = []
    for row in frames:
        for model, entry in row["lvpnet"].items():
            for variant, e in (("", entry), ("model_only", entry.get("model_only"))):
                if e is not None and not e["exact"]:
                    failures.append(
                        {
                            "frame": row["name"],
                            "codec": f"{model}{'/' if variant else ''}{variant}",
                            "error": e["error"],
                        }
                    )
                if e is not None and e.get("bytes") is not None and not e["split_complete"]:
                    failures.append({"frame": row["name"], "codec": model, "error": "byte split != length"})
        for codec, e in row["classical"].items():
            if e.get("lossless_failure"):
                failures.append({"frame": row["name"], "codec": codec, "error": e["reason"]})
    coverage = {
        codec: {
            "frames_covered": sum(1 for r in frames if r["classical"][codec]["covered"]),
            "not_covered": [
                {"frame": r["name"], "reason": r["classical"][codec]["reason"]}
                for r in frames
                if not r["classical"][codec]["covered"]
            ],
        }
        for codec in codec_map
    }
    heldout_series = None
    if split == "heldout":
        from lvpnet.train.data import load_heldout

        heldout_series = len(load_heldout())
    return {
        "command": command,
        "created": started.isoformat(timespec="seconds"),
        "run_seconds": round(time.perf_counter() - clock, 2),
        "machine": {**facts, "lvpnet_threads": max(1, threads), "classical_threads": 1},
        "libraries": _library_versions(),
        "settings": {
            "roots": [str(r) for r in root_paths],
            "split": split,
            "heldout_series": heldout_series,
            "limit": limit,
            "repeat": max(1, repeat),
            "threads": max(1, threads),
            "model_only": model_only,
        },
        "models": model_info,
        "codecs": {
            name: {"library": c.library, "params": c.params, "signed": "value - min (int32) as unsigned"}
            for name, c in codec_map.items()
        },
        "jpegls_reference": _jpegls_reference(list(codec_map)),
        "groups": list(GROUPS),
        "aggregates": _aggregate(frames, model_names, list(codec_map), model_only),
        "coverage": coverage,
        "failures": {"count": len(failures), "items": failures},
        "frames": frames,
    }


# -------------------------------------------------------------------------------- markdown


def _num(value: float | None, digits: int = 3, star: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    text = f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return text + ("*" if star else "")


def _pct(value: float | None, star: bool = False) -> str:
    return "—" if value is None else f"{value:+.1f}%" + ("*" if star else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _columns(result: dict[str, Any]) -> list[str]:
    return [*result["groups"], OVERALL]


def _series_rows(result: dict[str, Any]) -> list[tuple[str, Pick]]:
    """(label, group aggregate -> that row's aggregate) for every model, model-only and codec row."""
    rows: list[tuple[str, Pick]] = []
    for model in result["models"]:
        rows.append((f"**{model}**", _picker("lvpnet", model)))
        if result["settings"]["model_only"] and not model_spec(model)[1]:
            rows.append((f"{model} (model only)", _picker("lvpnet", model, "model_only")))
    for codec in result["codecs"]:
        rows.append((codec, _picker("classical", codec)))
    return rows


def _metric_table(result: dict[str, Any], key: str, digits: int) -> list[str]:
    aggregates, cols = result["aggregates"], _columns(result)
    body = []
    for label, pick in _series_rows(result):
        cells = []
        for group in cols:
            agg = pick(aggregates[group]) if aggregates[group]["frames"] else None
            value = agg.get(key) if agg else None
            partial = agg is not None and not agg["complete"] and value is not None
            cells.append(_num(value, digits, star=partial))
        body.append([label, *cells])
    return _table(["codec", *cols], body)


def write_markdown(result: dict[str, Any], path: str | Path) -> None:
    """A readable report of `run_bench`'s result (everything in it comes from the dict)."""
    machine, settings, aggregates = result["machine"], result["settings"], result["aggregates"]
    cols = _columns(result)
    overall = aggregates[OVERALL]
    jpegls = result.get("jpegls_reference")
    models = result["models"].items()
    lines = ["# LVPNet benchmark", "", "Command:", "", "```", result["command"], "```", ""]
    load = machine.get("load_average")
    lines += [
        f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores "
        f"({machine['usable_cores']} usable), "
        f"{machine['platform']}, Python {machine['python']}"
        + (f"; load average at start {', '.join(map(str, load))}" if load else "")
        + ".  ",
        f"Threads: LVPNet {machine['lvpnet_threads']} (CodecOptions.workers and torch threads); classical "
        f"codecs {machine['classical_threads']} (single-threaded).  ",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in result["libraries"].items()) + ".  ",
        f"Run {result['created']}, {result['run_seconds']:.0f} s.",
        "",
        f"Inputs: {', '.join(settings['roots'])}; split `{settings['split']}`"
        + (f" ({settings['heldout_series']} held-out series keys)" if settings["heldout_series"] else "")
        + (f"; first {settings['limit']} frames" if settings["limit"] is not None else "")
        + f".  {overall['frames']} unique frames, {overall['samples'] / 1e6:.3f} Msamples, "
        f"{overall['raw_bytes'] / 1e6:.3f} MB raw container bytes.  ",
        "Models: " + ", ".join(f"`{m}` (sha256 {v['sha256'][:12]}…)" for m, v in models) + ".",
        "",
        "bpp = 8·bytes / (rows·cols·samples), every byte of the stream counted (LVPNet: header, single-image "
        "adaptation, latents, pixels, raw and classical planes, per-plane records; `NAME+adaptN`: single-image "
        "mode, N fine-tuning steps per frame, fine-tuning included in the encode time; "
        "classical: the codestream plus a 1-byte side header, "
        "5 bytes for signed data).  Aggregates are totals (bytes-weighted).  MB/s = raw container MB "
        f"(1e6 B, BitsAllocated bytes per sample) per second of wall time, median of {settings['repeat']} "
        "run(s) per frame.  A `*` marks a figure over only part of the group's frames (coverage in the "
        "JSON).  Δ = model bytes / codec bytes − 1 over the frames both coded (negative: LVPNet smaller).  "
        "Classical times include the offset of signed data to unsigned and the side header; LVPNet times "
        "are compress() / decompress() calls, SHA-256 checks included.",
        "",
        "## Frames per group",
        "",
    ]
    lines += _table(
        ["group", *cols],
        [
            ["frames", *(str(aggregates[g]["frames"]) for g in cols)],
            ["Msamples", *(f"{aggregates[g]['samples'] / 1e6:.3f}" for g in cols)],
            ["raw MB", *(f"{aggregates[g]['raw_bytes'] / 1e6:.3f}" for g in cols)],
        ],
    )
    empty = [g for g in result["groups"] if not aggregates[g]["frames"]]
    if empty:
        lines += [f"No frames: {', '.join(empty)} (shown as —).", ""]

    lines += ["## bpp (bits per sample, bytes-weighted; lower is better)", ""]
    lines += _metric_table(result, "bpp", 3)

    refs = [r for r in (JXL, jpegls) if r in result["codecs"]]
    lines += ["## LVPNet vs JPEG-XL and JPEG-LS (Δ bytes, %)", ""]
    body = []
    for model in result["models"]:
        for ref in refs:
            cells = []
            for g in cols:
                d = aggregates[g]["deltas"][model].get(f"vs_{ref}") if aggregates[g]["frames"] else None
                cells.append(_pct(d["pct"], star=not d["complete"]) if d else "—")
            body.append([f"{model} vs {ref}", *cells])
    lines += _table(["comparison", *cols], body)

    for model in result["models"]:
        variants = [("", _picker("lvpnet", model))]
        if settings["model_only"] and not model_spec(model)[1]:
            variants.append((" (model only, 1 timed run)", _picker("lvpnet", model, "model_only")))
        for suffix, pick in variants:
            lines += [f"## {model}{suffix}: where the bits go (bpp) and speed", ""]
            body = []
            for g in cols:
                if not aggregates[g]["frames"]:
                    body.append([g, "0", *["—"] * (len(SPLIT_PARTS) + 5)])
                    continue
                a = pick(aggregates[g]) or {}
                frac = a["model_plane_fraction"]
                body.append(
                    [
                        g,
                        str(a["frames"]),
                        _num(a["bpp"], 3, star=not a["complete"]),
                        *(_num(a["split_bpp"][p], 3) for p in SPLIT_PARTS),
                        "—" if frac is None else f"{100 * frac:.1f}%",
                        _num(a["encode_mbps"], 2),
                        _num(a["decode_mbps"], 2),
                        str(a["failures"]),
                    ]
                )
            lines += _table(
                ["group", "frames", "bpp", *SPLIT_PARTS, "model planes", "enc MB/s", "dec MB/s", "failures"],
                body,
            )

    lines += [f"## Encode MB/s (LVPNet {machine['lvpnet_threads']} thread(s), classical 1 thread)", ""]
    lines += _metric_table(result, "encode_mbps", 2)
    lines += [f"## Decode MB/s (LVPNet {machine['lvpnet_threads']} thread(s), classical 1 thread)", ""]
    lines += _metric_table(result, "decode_mbps", 2)

    failures = result["failures"]
    lines += ["## Verification", ""]
    checks = sum(1 + ("model_only" in e) for r in result["frames"] for e in r["lvpnet"].values())
    lines += [
        f"LVPNet decodes compared with the input (dtype, shape, values): {checks}; classical decodes: "
        f"{sum(len(r['classical']) for r in result['frames'])}.  Failures: **{failures['count']}**.",
        "",
    ]
    if failures["items"]:
        items = [[f["frame"], f["codec"], f["error"]] for f in failures["items"]]
        lines += _table(["frame", "codec", "error"], items)
    missing = [
        [codec, str(len(c["not_covered"])), "; ".join(sorted({x["reason"] for x in c["not_covered"]}))[:300]]
        for codec, c in result["coverage"].items()
        if c["not_covered"]
    ]
    if missing:
        lines += ["Frames a classical codec could not code (not counted for it):", ""]
        lines += _table(["codec", "frames", "reasons"], missing)

    lines += ["## Codecs", ""]
    lines += _table(
        ["codec", "library", "parameters", "signed input"],
        [[n, c["library"], f"`{c['params']}`", c["signed"]] for n, c in result["codecs"].items()],
    )

    names = [*result["models"], *result["codecs"]]
    lines += ["## Per frame (bpp)", "", "<details><summary>frames</summary>", ""]
    body = []
    for r in result["frames"]:
        bpps: list[float | None] = [r["lvpnet"][m].get("bpp") for m in result["models"]]
        bpps += [r["classical"][c].get("bpp") for c in result["codecs"]]
        body.append(
            [
                r["name"],
                r["group"],
                "×".join(map(str, r["shape"])),
                f"{r['bits_stored']}/{r['bits_allocated']}{'s' if r['dtype'].startswith('int') else 'u'}",
                *(_num(v, 3) if v is not None else "n/a" for v in bpps),
            ]
        )
    lines += _table(["frame", "group", "shape", "BS/BA", *names], body)
    lines += ["</details>", ""]
    Path(path).write_text("\n".join(lines))


# ----------------------------------------------------------------------------------- chart


def write_chart(result: dict[str, Any], path: str | Path) -> None:
    """Grouped bars: bpp per modality group (groups with frames, plus overall), one bar per codec."""
    # The object API with an Agg canvas: no pyplot, no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    aggregates = result["aggregates"]
    groups = [g for g in _columns(result) if aggregates[g]["frames"]]
    series = [(label.strip("*"), pick) for label, pick in _series_rows(result)]
    # Wide enough for every bar of every group, plus the legend column.
    width_in = 3.0 + max(4.0, 0.22 * len(groups) * max(1, len(series)))
    fig = Figure(figsize=(width_in, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (label, pick) in enumerate(series):
        values = []
        for g in groups:
            agg = pick(aggregates[g])
            values.append(agg["bpp"] if agg and agg.get("bpp") is not None else np.nan)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, [f"{g}\n({aggregates[g]['frames']} fr.)" for g in groups])
    ax.set_ylabel("bits per sample (lower is better)")
    ax.set_title(f"Lossless bpp by modality group — split {result['settings']['split']}")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")  # beside the axes: never over a bar
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- CLI


def cmd_bench(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    # The exact options that produced the report, defaults included.
    parts = ["lvpnet", "bench", *map(str, args.roots), "--json", str(args.json_out), "--md", str(args.md)]
    if args.chart:
        parts += ["--chart", str(args.chart)]
    if models:
        parts += ["--models", ",".join(models)]
    parts += ["--split", args.split, "--threads", str(args.threads), "--repeat", str(args.repeat)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    if not args.model_only:
        parts += ["--no-model-only"]
    result = run_bench(
        args.roots,
        models=models,
        split=args.split,
        threads=args.threads,
        repeat=args.repeat,
        limit=args.limit,
        model_only=args.model_only,
        progress=not getattr(args, "quiet", False),
        command=shlex.join(parts),
    )
    for target in (args.json_out, args.md, args.chart):
        if target is not None:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    write_markdown(result, args.md)
    if args.chart:
        write_chart(result, args.chart)
    failures = result["failures"]["count"]
    print(
        f"{result['aggregates'][OVERALL]['frames']} frames; wrote {args.json_out}, {args.md}"
        + (f", {args.chart}" if args.chart else "")
        + f"; failures: {failures}"
    )
    for item in result["failures"]["items"]:
        print(f"FAILED {item['frame']} [{item['codec']}]: {item['error']}", file=sys.stderr)
    return 1 if failures else 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `lvpnet bench DIR... --json OUT --md OUT [...]` on an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmark LVPNet models against classical lossless codecs")
    bench.add_argument("roots", nargs="+", type=Path, metavar="DIR", help="DICOM/PNG/TIFF folders")
    bench.add_argument("--json", dest="json_out", type=Path, required=True, help="full results (per frame)")
    bench.add_argument("--md", type=Path, required=True, help="markdown report")
    bench.add_argument("--chart", type=Path, default=None, help="PNG bar chart of bpp by group and codec")
    bench.add_argument(
        "--models",
        default=None,
        help="comma-separated zoo names (default: zoo default); NAME+adaptN: single-image mode, N fine-tuning steps",
    )
    bench.add_argument("--split", choices=["heldout", "all"], default="heldout")
    bench.add_argument("--threads", type=int, default=1, help="LVPNet threads (classical codecs use 1)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs per frame (the median is kept)")
    bench.add_argument("--limit", type=int, default=None, help="at most N frames")
    bench.add_argument(
        "--no-model-only",
        dest="model_only",
        action="store_false",
        help="skip the model-only figures (raw fallback off)",
    )
    bench.set_defaults(func=cmd_bench)
    return bench
