"""What the exact integer decode path costs against the float model it was exported from.

    .venv/bin/python bench/quantisation_gap.py CHECKPOINT [--per-group 3] [--out bench/quantisation-gap]

CHECKPOINT is a context model's training checkpoint (`last.pt`, e.g. from `lvpnet ablate`).  For
held-out frames (the committed split, at most --per-group per modality group, grey frames only):

* float: the training objective on the codec's own tiling (512 x 512 tiles, each shifted to its
  minimum and edge-padded to the latent grid, padding masked out): bits(x | z, context) under
  the float network's continuous Laplace, plus the latent rate proxy, in float64;
* integer, no adaptation: the bytes of the stream the exported integer model writes with its
  per-plane scale offsets forced to 0 (model on every plane, every byte counted: header, z,
  pixels, per-tile records), decoded again and compared;
* integer, as written: the same with the per-plane offsets the encoder chooses (what ships).

The gap (no adaptation / float - 1) is what weight and activation quantisation, the integer CDF
tables (1/16 mean, 1/8-octave scale, 16-bit frequencies), real z coding and the container cost
together; quantisation-aware training could at most win that back.  The offsets are not in the
float objective, so "as written" can fall below it.  Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lvpnet.codec import DEFAULT_TILE_SIZE, CodecOptions, compress, decompress
from lvpnet.eval.bench import GROUPS, _frames, machine_facts, modality_group
from lvpnet.model.context import STEP_TYPES, ContextLVPNet
from lvpnet.train.losses import context_bits
from lvpnet.train.trainer import load_checkpoint_model
from lvpnet.zoo import ZOO, bundle_from_model


def float_bits(model: ContextLVPNet, frame: np.ndarray, tile: int = DEFAULT_TILE_SIZE) -> float:
    """The float model's code length of a grey frame, tile by tile as the codec splits it."""
    stride = model.config.latent_stride
    total = 0.0
    for top in range(0, frame.shape[0], tile):
        for left in range(0, frame.shape[1], tile):
            block = frame[top : top + tile, left : left + tile].astype(np.int64)
            values = block - block.min()
            if not values.any():
                continue  # a constant plane costs no pixel bits in the stream either
            bits = max(1, int(values.max()).bit_length())
            h, w = values.shape
            hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
            padded = np.pad(values, ((0, hp - h), (0, wp - w)), mode="edge")
            mask = np.zeros((hp, wp), dtype=bool)
            mask[:h, :w] = True
            x_int = torch.from_numpy(padded)[None, None]
            x_norm = x_int.to(torch.float32) / 2.0**bits  # as the training sampler scales crops
            with torch.no_grad():
                pixel, z = context_bits(model, x_norm, x_int, torch.from_numpy(mask)[None, None], torch.tensor([bits]))
            total += float(pixel) + float(z)
    return total


def _encode(
    bundle: Any, array: np.ndarray, bits_stored: int, options: CodecOptions, *, adapt: bool
) -> tuple[bytes, bool]:
    """A real stream of the bundle's model on every plane; adapt=False forces the per-plane offsets to 0."""
    coder = bundle.plane_coder()
    if not adapt:  # instrument the encoder's choice only; the stream stays a real, decodable one
        coder._choose_scale_offsets = lambda *_: [0] * len(STEP_TYPES)
    try:
        data = compress(array, bits_stored=bits_stored, color="MONOCHROME", model=bundle.name, options=options)
    finally:
        coder.__dict__.pop("_choose_scale_offsets", None)
    return data, bool(np.array_equal(decompress(data, options=options), array))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/corpus/dev"))
    parser.add_argument("--per-group", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/quantisation-gap"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_checkpoint_model(args.checkpoint)
    if not isinstance(model, ContextLVPNet):
        print("the gap is measured for context models", file=sys.stderr)
        return 2
    name = f"gap-{args.checkpoint.parent.name}"
    bundle = bundle_from_model(model, name)  # the same weights the float objective is measured with
    ZOO.register(bundle)
    options = CodecOptions(workers=args.threads, raw_fallback=False)
    rows, taken = [], dict.fromkeys(GROUPS, 0)
    for frame_name, array, info in _frames([args.data], "heldout"):
        group = modality_group(info.get("modality"))
        if array.ndim != 2 or taken[group] >= args.per_group:
            continue
        taken[group] += 1
        bits_stored = int(info.get("bits_stored") or 8 * array.dtype.itemsize)
        plain, plain_exact = _encode(bundle, array, bits_stored, options, adapt=False)
        stream, exact = _encode(bundle, array, bits_stored, options, adapt=True)
        rows.append(
            {
                "frame": frame_name,
                "group": group,
                "samples": int(array.size),
                "float_bpp": float_bits(model, array) / array.size,
                "no_adapt_bpp": 8 * len(plain) / array.size,
                "stream_bpp": 8 * len(stream) / array.size,
                "exact": exact and plain_exact,
            }
        )
        row = rows[-1]
        print(
            f"{frame_name}: float {row['float_bpp']:.4f}, integer {row['no_adapt_bpp']:.4f} / {row['stream_bpp']:.4f}"
        )
    summary = {}
    for group in (*GROUPS, "overall"):
        members = [r for r in rows if group in ("overall", r["group"])]
        if not members:
            continue
        samples = sum(r["samples"] for r in members)
        fl, na, st = (sum(r[k] * r["samples"] for r in members) / samples
                      for k in ("float_bpp", "no_adapt_bpp", "stream_bpp"))  # fmt: skip
        summary[group] = {
            "frames": len(members),
            "float_bpp": fl,
            "no_adapt_bpp": na,
            "stream_bpp": st,
            "gap_pct": 100 * (na / fl - 1),
            "adaptation_pct": 100 * (st / na - 1),
        }
    command = "bench/quantisation_gap.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_facts(),
        "checkpoint": str(args.checkpoint),
        "weights_sha256": bundle.sha256,
        "summary": summary,
        "frames": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Float model vs exact integer stream (quantisation gap)",
        "",
        "Produced by",
        "",
        f"    .venv/bin/python {command}",
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip().removesuffix("Writes <out>.json and <out>.md.").strip(),
        "",
        f"Weights: `{args.checkpoint}` exported as sha256 `{bundle.sha256[:16]}`; "
        f"{sum(1 for r in rows if r['exact'])}/{len(rows)} streams decoded bit-exact.",
        "",
        "| group | frames | float model bpp | integer, no adaptation | gap | integer, as written | offsets |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, s in summary.items():
        lines.append(
            f"| {group} | {s['frames']} | {s['float_bpp']:.4f} | {s['no_adapt_bpp']:.4f} | {s['gap_pct']:+.2f} % "
            f"| {s['stream_bpp']:.4f} | {s['adaptation_pct']:+.2f} % |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
