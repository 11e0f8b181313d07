"""`lvpnet` command line: encode, decode, info, train, bench, ablate, zoo.  `main(argv)` is what tests call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from lvpnet.errors import LVPNetError

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".tif", ".tiff", ""}


def _inputs(path: Path, suffixes: set[str]) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return [path]


def _target(source: Path, root: Path, out: Path, suffix: str, many: bool) -> Path:
    if not many:
        return out
    relative = source.relative_to(root) if root.is_dir() else Path(source.name)
    if suffix == ".lvp":
        return out / relative.with_name(relative.name + ".lvp")  # img.png -> img.png.lvp
    original = relative.with_suffix("")  # img.png.lvp -> img.png
    return out / original.with_suffix(suffix)


def cmd_encode(args: argparse.Namespace) -> int:
    from lvpnet.codec import CodecOptions, compress
    from lvpnet.imageio import read_image

    sources = _inputs(args.input, IMAGE_SUFFIXES)
    many = args.input.is_dir()
    failures = 0
    for source in tqdm(sources, disable=not many or args.quiet, unit="file"):
        try:
            array, info = read_image(source)
            data = compress(
                array,
                bits_stored=info.get("bits_stored"),
                color=info.get("color"),
                model=args.model,
                tile_size=args.tile_size,
                options=CodecOptions(workers=args.threads, adapt_steps=args.adapt_steps),
            )
        except LVPNetError as exc:
            failures += 1
            print(f"{source}: {exc}", file=sys.stderr)
            continue
        target = _target(source, args.input, args.output, ".lvp", many)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if not many and not args.quiet:
            print(f"{source} -> {target}: {len(data)} bytes, {8 * len(data) / array.size:.3f} bits/sample")
    return 1 if failures else 0


def cmd_decode(args: argparse.Namespace) -> int:
    import numpy as np

    from lvpnet.codec import CodecOptions, decompress

    sources = _inputs(args.input, {".lvp"})
    many = args.input.is_dir()
    failures = 0
    for source in tqdm(sources, disable=not many or args.quiet, unit="file"):
        try:
            array = decompress(source.read_bytes(), options=CodecOptions(workers=args.threads))
        except LVPNetError as exc:
            failures += 1
            print(f"{source}: {exc}", file=sys.stderr)
            continue
        target = _target(source, args.input, args.output, f".{args.format}", many)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_array(target, array, np)
    return 1 if failures else 0


def _write_array(target: Path, array, np) -> None:  # type: ignore[no-untyped-def]
    suffix = target.suffix.lower()
    if suffix == ".npy":
        np.save(target, array)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(target, array)
    elif suffix == ".png":
        from PIL import Image

        if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
            raise SystemExit(f"{target}: PNG holds one unsigned 8/16-bit frame; use .npy or .tiff")
        Image.fromarray(array).save(target)
    else:
        raise SystemExit(f"unknown output format {suffix}")


def cmd_info(args: argparse.Namespace) -> int:
    from lvpnet.spec.container import parse_header

    try:
        header = parse_header(args.input.read_bytes())
    except LVPNetError as exc:
        print(f"{args.input}: {exc}", file=sys.stderr)
        return 1
    d = header.descriptor
    size = args.input.stat().st_size
    info = {
        "codec_id": header.codec_id,
        "weights_sha256": header.weights_sha256.hex(),
        "coder_version": header.coder_version,
        "shape": list(d.shape()),
        "dtype": d.dtype.numpy_name,
        "bits_stored": d.bits_stored,
        "color": d.color.name,
        "tile_size": d.tile_size,
        "chunks": len(header.chunks),
        "format_version": header.version,
        "header_bytes": header.header_length,
        "adaptation_bytes": len(header.adaptation),
        "stream_bytes": size,
        "bits_per_sample": round(8 * size / d.sample_count, 4),
        "raw_sha256": header.raw_sha256.hex(),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import hashlib

    from lvpnet.model.configs import CONFIGS, config_from_dict
    from lvpnet.train.data import load_frames, load_heldout
    from lvpnet.train.trainer import TrainSettings, train
    from lvpnet.zoo import WEIGHTS_DIR, bundle_from_model, register_in_file

    config = CONFIGS[args.config]
    overrides = {k: v for k, v in (("sampling_ratio", args.ratio), ("q_step", args.q_step)) if v is not None}
    if overrides:
        config = config_from_dict({**config.to_dict(), **overrides, "name": args.name or config.name})
    frames = load_frames([Path(p) for p in args.data], heldout=load_heldout(), split="train")
    print(f"{len(frames)} training planes", file=sys.stderr)
    settings = TrainSettings(
        steps=args.steps,
        batch=args.batch,
        crop=args.crop,
        learning_rate=args.lr,
        seed=args.seed,
        rate_weight=args.rate_weight,
        device=args.device,
        threads=args.threads,
        decay_every=max(1, args.steps // 2),
        max_minutes=args.minutes,
        quantisation_aware=args.qat,
        init_from=args.init,
    )
    name = args.name or config.name
    model = train(config, frames, settings, args.checkpoints / name, progress=not args.quiet)
    bundle = bundle_from_model(model, name)
    if args.register:
        path = bundle.save(WEIGHTS_DIR)
        register_in_file(bundle, path, make_default=args.default)
        print(f"registered {name} ({bundle.sha256[:16]}) -> {path}")
    else:
        out = bundle.save(args.checkpoints / name)
        print(f"exported {out} sha256={hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from lvpnet.zoo import ZOO

    for name in ZOO.names():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvpnet", description="LVPNet lossless medical image codec")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encode", help="DICOM/PNG/TIFF (file or folder) -> .lvp")
    enc.add_argument("input", type=Path)
    enc.add_argument("-o", "--output", type=Path, required=True)
    enc.add_argument("--model", default=None, help="zoo model name (default: the zoo's default)")
    enc.add_argument("--tile-size", type=int, default=512)
    enc.add_argument("--threads", type=int, default=1)
    enc.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="single-image mode: fine-tune the model on each image for N steps (~0.1 s each) and store the "
        "weight delta in the stream when it makes the stream smaller (0: off)",
    )
    enc.set_defaults(func=cmd_encode)

    dec = sub.add_parser("decode", help=".lvp (file or folder) -> image")
    dec.add_argument("input", type=Path)
    dec.add_argument("-o", "--output", type=Path, required=True)
    dec.add_argument("--format", default="npy", choices=["npy", "png", "tiff"], help="for folders")
    dec.add_argument("--threads", type=int, default=1)
    dec.set_defaults(func=cmd_decode)

    info = sub.add_parser("info", help="print a stream's header (needs no model)")
    info.add_argument("input", type=Path)
    info.set_defaults(func=cmd_info)

    tr = sub.add_parser("train", help="train a configuration on DICOM/PNG/TIFF folders")
    tr.add_argument("--data", nargs="+", required=True)
    tr.add_argument("--config", default="lvpnet-dataset")
    tr.add_argument("--name", default=None)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--crop", type=int, default=128)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--ratio", type=float, default=None, help="sampling ratio r")
    tr.add_argument("--q-step", type=float, default=None)
    tr.add_argument("--rate-weight", type=float, default=0.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--minutes", type=float, default=None, help="compute budget")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    tr.add_argument("--qat", action="store_true", help="quantisation-aware: round as the integer decoder does")
    tr.add_argument("--init", default=None, metavar="NAME", help="start from this zoo model's weights")
    tr.add_argument("--register", action="store_true", help="ship the weights in the package zoo")
    tr.add_argument("--default", action="store_true", help="make it the zoo's default model")
    tr.set_defaults(func=cmd_train)

    from lvpnet.eval.bench import add_bench_parser

    add_bench_parser(sub)

    from lvpnet.eval.ablation import add_ablate_parser

    add_ablate_parser(sub)

    zoo = sub.add_parser("zoo", help="list the models in the weights zoo")
    zoo.set_defaults(func=cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
