"""compress / decompress: arrays <-> `.lvp` streams, through tiles that code and decode independently.

Each frame is cut into tiles of at most T x T; each tile is one chunk holding one record per
sample plane.  A plane is coded as a constant, as packed raw bits, with the model (latent z +
pixels under the integer Laplace tables), or (format version 2) as a lossless JPEG-LS or JPEG XL
codestream, whichever is smallest: so no plane is ever stored much larger than its raw bits or
than the classical codecs would store it, and the model is used where it wins.  Samples are
coded as value - tile minimum (computed in int32), never as two's-complement bit patterns, and
whatever bits the caller's words carry (overlays in the bits above BitsStored included) come back
unchanged: `bits_stored` is recorded, never applied as a mask.  Padding to the latent grid (edge
replication) only feeds the encoder's analysis; padded samples are never coded.
"""

from __future__ import annotations

import struct
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import IntEnum

import imagecodecs
import numpy as np
import torch

from lvpnet.entropy.fields import pack_fields, unpack_fields
from lvpnet.entropy.pixelcoder import CODER_VERSION
from lvpnet.errors import CorruptStreamError, LVPNetError, UnsupportedInputError, UnsupportedStreamError
from lvpnet.model.context_coding import ExactContext
from lvpnet.spec.container import (
    DEFAULT_MAX_SAMPLES,
    MAX_DIMENSION,
    MAX_TILE_SIZE,
    Chunk,
    Color,
    Descriptor,
    DType,
    Header,
    Layout,
    check_chunk,
    pack_header,
    parse_header,
    sha256,
)
from lvpnet.zoo import ZOO, ModelBundle

DEFAULT_TILE_SIZE = 512
DEFAULT_BATCH = 4


class PlaneMode(IntEnum):
    CONSTANT = 0
    RAW = 1
    MODEL = 2
    JPEGLS = 3  # format version 2: the plane as a lossless JPEG-LS codestream (CharLS)
    JPEGXL = 4  # format version 2: the plane as a lossless JPEG XL codestream (libjxl, modular)
    # format version 3, first record of a 3-sample tile only: the whole tile, as the caller's samples
    # (before the colour transform), in one lossless JPEG XL codestream; no further records follow.
    # libjxl decorrelates the channels itself (and better than one fixed RCT), which is what
    # planes coded apart cannot do.
    JPEGXL_TILE = 5


CLASSICAL_MODES = {"jpegls": PlaneMode.JPEGLS, "jpegxl": PlaneMode.JPEGXL}
CLASSICAL_MAX_BITS = 16  # both codecs take at most 16-bit samples (an RCT chroma plane may need 17)


@dataclass
class _Plane:
    """One sample plane of one tile: values are `x - minimum`, in [0, 2**bits)."""

    values: np.ndarray  # int64 (h, w)
    minimum: int
    bits: int
    mode: PlaneMode = PlaneMode.CONSTANT
    payload: bytes = b""
    z: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CodecOptions:
    """Knobs that never change the decoded result: speed, memory, and (encoder only) whether a
    plane may fall back to raw bits when the model codes it larger."""

    batch: int = DEFAULT_BATCH  # tiles per network call
    workers: int = 1  # threads over batches
    compute: str = "float64"  # "auto": float32 where a layer is proven exact in it
    device: str = "cpu"
    channels_last: bool = False  # memory layout of the network's activations
    raw_fallback: bool = True  # False: always code varying planes with the model (ablations, tests)
    # Encoder only: classical codecs a plane may be coded with instead, when they are smaller than
    # the model (the per-tile choice); () for the learned coder alone.  Ignored without raw_fallback.
    classical_planes: tuple[str, ...] = ("jpegls", "jpegxl")
    # Encoder only, single-image mode (context models): fine-tune the step networks on this image
    # for this many steps and store the integer weight delta in the stream (format version 3) when
    # the stream, delta included, comes out smaller.  0: off.  About 0.1 s of CPU per step.
    adapt_steps: int = 0
    adapt_only_if_smaller: bool = True  # False: keep the fine-tuned delta whatever it costs (tests)


# ---------------------------------------------------------------------------------------- API


def compress(
    pixels: np.ndarray,
    *,
    bits_stored: int | None = None,
    color: str | None = None,
    model: str | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    samples_axis: bool | None = None,
    options: CodecOptions | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> bytes:
    """Compress an integer image array losslessly.

    pixels: (rows, cols), (frames, rows, cols), or either with a trailing samples axis (1 or 3);
    uint8/int8/uint16/int16.  A 3-D array has a samples axis when `color == "RGB"` (or when
    `samples_axis=True`); 4-D arrays always do.  `color`: "MONOCHROME", "RGB" (coded after a
    reversible colour transform) or None (samples coded as plain channels).
    """
    options = options or CodecOptions()
    array = np.asarray(pixels)
    dtype = DType.from_numpy(array.dtype.name)
    layout = _layout(array, color, samples_axis)
    frames = _as_frames(array, layout)
    n_frames, rows, cols, samples = frames.shape
    if rows < 1 or cols < 1 or n_frames < 1:
        raise UnsupportedInputError(f"empty image of shape {array.shape}")
    if rows > MAX_DIMENSION or cols > MAX_DIMENSION or frames.size > max_samples:
        raise UnsupportedInputError(f"image of shape {array.shape} exceeds the size limit")
    if samples not in (1, 3):
        raise UnsupportedInputError(f"{samples} samples per pixel (1 or 3 supported)")
    color_code = {None: Color.PLANES, "MONOCHROME": Color.MONOCHROME, "RGB": Color.RGB}.get(color)
    if color_code is None:
        raise UnsupportedInputError(f"unknown colour model {color!r} (MONOCHROME, RGB or None)")
    if (color_code == Color.RGB) != (samples == 3 and color_code == Color.RGB) or (
        color_code == Color.MONOCHROME and samples != 1
    ):
        raise UnsupportedInputError(f"colour {color} does not match {samples} samples per pixel")
    full_bits = 8 * dtype.itemsize
    bits_stored = full_bits if bits_stored is None else int(bits_stored)
    if not 1 <= bits_stored <= full_bits:
        raise UnsupportedInputError(f"bits_stored {bits_stored} does not fit {array.dtype}")
    if tile_size < 8 or tile_size % 8 or tile_size > MAX_TILE_SIZE:
        raise UnsupportedInputError(f"tile size must be a positive multiple of 8, at most {MAX_TILE_SIZE}")

    bundle = ZOO.get(model)
    planes = frames.astype(np.int32)
    if color_code == Color.RGB:
        planes = _forward_rct(planes)
    descriptor = Descriptor(rows, cols, n_frames, samples, dtype, bits_stored, color_code, layout, tile_size)
    data, model_planes = _encode(array, frames, planes, descriptor, bundle, options, use_model=True)
    # Where the model won no plane and the frame spans several tiles, the classical codecs may do
    # better on whole frames (no tile edges): try it, keep the smaller stream.
    whole = -(-max(rows, cols) // 8) * 8
    if (
        not model_planes
        and options.raw_fallback
        and options.classical_planes
        and descriptor.tiles_per_frame > 1
        and whole <= MAX_TILE_SIZE
    ):
        descriptor = replace(descriptor, tile_size=whole)
        alternative, _ = _encode(array, frames, planes, descriptor, bundle, options, use_model=False)
        if len(alternative) < len(data):
            data = alternative
    return data


def _encode(
    array: np.ndarray,
    frames: np.ndarray,
    planes: np.ndarray,
    descriptor: Descriptor,
    bundle: ModelBundle,
    options: CodecOptions,
    *,
    use_model: bool,
) -> tuple[bytes, int]:
    """(the stream at this tiling, how many planes it codes with the model)."""
    tiles: list[list[_Plane]] = []
    for f in range(descriptor.frames):
        for t in range(descriptor.tiles_per_frame):
            top, left, h, w = descriptor.tile_rect(t)
            region = planes[f, top : top + h, left : left + w]
            tiles.append([_make_plane(region[:, :, s]) for s in range(descriptor.samples)])
    _encode_planes(bundle, [p for tile in tiles for p in tile], options, use_model=use_model)
    joint: list[_Plane | None] = [None] * len(tiles)
    if (
        descriptor.samples == 3
        and descriptor.dtype in (DType.UINT8, DType.UINT16)
        and options.raw_fallback
        and "jpegxl" in options.classical_planes
    ):
        joint = _joint_tiles(frames, descriptor)
    adaptation = b""
    if use_model and options.adapt_steps > 0:
        adaptation, tiles = _adapt(bundle, tiles, joint, options)
    tiles = _with_joint_tiles(tiles, joint, version_paid=bool(adaptation))
    model_planes = sum(p.mode == PlaneMode.MODEL for tile in tiles for p in tile)
    chunk_bytes = [b"".join(_pack_plane(p) for p in tile) for tile in tiles]

    chunks, offset = [], 0
    for body in chunk_bytes:
        chunks.append(Chunk(offset, len(body), zlib.crc32(body)))
        offset += len(body)
    header = Header(
        codec_id=bundle.name,
        weights_sha256=bytes.fromhex(bundle.sha256),
        coder_version=CODER_VERSION,
        descriptor=descriptor,
        raw_sha256=sha256(_canonical_bytes(array)),
        frame_sha256=[sha256(_canonical_bytes(frames[f])) for f in range(descriptor.frames)],
        chunks=chunks,
        # The lowest version that holds the stream, so that older readers take what they can
        version=_version_needed(tiles, adaptation),
        adaptation=adaptation,
    )
    return pack_header(header) + b"".join(chunk_bytes), model_planes


def decompress(
    data: bytes, *, options: CodecOptions | None = None, max_samples: int = DEFAULT_MAX_SAMPLES
) -> np.ndarray:
    """Decode a stream to the array given to `compress`: same dtype, shape and bits, or an error."""
    data = bytes(data)
    header = parse_header(data, max_samples=max_samples)
    frames = _guarded_decode(data, header, range(header.descriptor.frames), options or CodecOptions())
    try:
        out = frames.reshape(header.descriptor.shape())
    except ValueError as exc:  # a header (valid CRC) whose layout contradicts its frames/samples
        raise CorruptStreamError(f"decoded frames do not fit the header's layout: {exc}") from exc
    if sha256(_canonical_bytes(out)) != header.raw_sha256:
        raise CorruptStreamError("decoded array does not match the stream's SHA-256")
    return out


def decompress_frames(
    data: bytes,
    frame_indices: Sequence[int],
    *,
    options: CodecOptions | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> np.ndarray:
    """Decode only some frames: (len(frame_indices), rows, cols[, samples]), each SHA-256 checked."""
    data = bytes(data)
    header = parse_header(data, max_samples=max_samples)
    d = header.descriptor
    for f in frame_indices:
        if not 0 <= f < d.frames:
            raise IndexError(f"frame {f} out of range (stream has {d.frames})")
    frames = _decode_frames(data, header, frame_indices, options or CodecOptions())
    return frames if d.layout in (Layout.ROWS_COLS_SAMPLES, Layout.FRAMES_ROWS_COLS_SAMPLES) else frames[..., 0]


def stream_stats(data: bytes) -> dict[str, int]:
    """Where a stream's bytes go: header, single-image adaptation, latent z, model-coded pixels,
    raw planes, classical (JPEG-LS / JPEG XL) planes, per-plane records; plus plane counts by mode.  Sums to len(data)
    (every byte counted)."""
    header = parse_header(data, max_samples=1 << 62)
    d = header.descriptor
    # adaptation: a version 3 stream's single-image weight delta and its u32 length (in the header)
    adaptation = 4 + len(header.adaptation) if header.version >= 3 else 0
    stats = {"header": header.header_length - adaptation, "adaptation": adaptation}
    stats.update({"z": 0, "pixels": 0, "raw": 0, "classical": 0, "plane_records": 0})
    stats.update({f"planes_{m.name.lower()}": 0 for m in PlaneMode})
    for index in range(len(header.chunks)):
        body = memoryview(check_chunk(data, header, index))
        for _ in range(d.samples):
            (mode, _minimum), body = _read(body, "<Bi")
            if mode == PlaneMode.JPEGXL_TILE:  # the whole tile in one record
                (n,), body = _read(body[1:], "<I")
                _payload, body = _take(body, n)
                stats["planes_jpegxl_tile"] += 1
                stats["plane_records"] += 10
                stats["classical"] += n
                break
            stats[f"planes_{PlaneMode(mode).name.lower()}"] += 1
            stats["plane_records"] += 5
            if mode == PlaneMode.CONSTANT:
                continue
            _bits, body = _read(body, "<B")
            stats["plane_records"] += 1
            sections = {PlaneMode.RAW: ("raw",), PlaneMode.MODEL: ("z", "pixels")}.get(mode, ("classical",))
            for section in sections:
                (n,), body = _read(body, "<I")
                _payload, body = _take(body, n)
                stats[section] += n
                stats["plane_records"] += 4
    return stats


# ------------------------------------------------------------------------------------ layout


def _layout(array: np.ndarray, color: str | None, samples_axis: bool | None) -> Layout:
    if samples_axis is None:
        samples_axis = array.ndim == 4 or (array.ndim == 3 and color == "RGB")
    table = {
        (2, False): Layout.ROWS_COLS,
        (3, False): Layout.FRAMES_ROWS_COLS,
        (3, True): Layout.ROWS_COLS_SAMPLES,
        (4, True): Layout.FRAMES_ROWS_COLS_SAMPLES,
    }
    layout = table.get((array.ndim, samples_axis))
    if layout is None:
        raise UnsupportedInputError(f"cannot interpret an array of shape {array.shape} as an image")
    return layout


def _as_frames(array: np.ndarray, layout: Layout) -> np.ndarray:
    """View as (frames, rows, cols, samples)."""
    if layout == Layout.ROWS_COLS:
        return array[None, :, :, None]
    if layout == Layout.FRAMES_ROWS_COLS:
        return array[:, :, :, None]
    if layout == Layout.ROWS_COLS_SAMPLES:
        return array[None]
    return array


def _canonical_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _forward_rct(rgb: np.ndarray) -> np.ndarray:
    """JPEG 2000's reversible colour transform on int32 samples."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([(r + 2 * g + b) >> 2, b - g, r - g], axis=-1)


def _inverse_rct(ycc: np.ndarray) -> np.ndarray:
    y, cb, cr = ycc[..., 0], ycc[..., 1], ycc[..., 2]
    g = y - ((cb + cr) >> 2)
    return np.stack([cr + g, g, cb + g], axis=-1)


# ------------------------------------------------------------------------------------ planes


def _make_plane(region: np.ndarray) -> _Plane:
    minimum, maximum = int(region.min()), int(region.max())
    values = region.astype(np.int64) - minimum
    bits = max(1, (maximum - minimum).bit_length())
    return _Plane(values, minimum, bits)


def _batches(planes: Iterable[_Plane], batch: int) -> list[list[_Plane]]:
    by_shape: dict[tuple[int, int], list[_Plane]] = defaultdict(list)
    for plane in planes:
        by_shape[plane.values.shape].append(plane)
    return [g[i : i + max(1, batch)] for g in by_shape.values() for i in range(0, len(g), max(1, batch))]


def _encode_planes(bundle: ModelBundle, planes: list[_Plane], options: CodecOptions, *, use_model: bool = True) -> None:
    """Each varying plane's smallest coding (the model's alone without raw_fallback);
    `use_model=False`: raw and classical only (the whole-frame classical pass)."""
    varying = []
    for plane in planes:
        if plane.values.max() == 0:
            plane.mode = PlaneMode.CONSTANT
        else:
            varying.append(plane)
    if not varying:
        return
    coder = bundle.plane_coder() if use_model else None

    def run(batch: list[_Plane]) -> None:
        values = np.stack([p.values for p in batch])
        bits = np.array([p.bits for p in batch])
        coded = coder.encode(values, bits, options) if coder is not None else [None] * len(batch)
        for plane, streams in zip(batch, coded, strict=True):
            choices = []
            if streams is not None:
                latent, pixels = streams
                plane.mode = PlaneMode.MODEL
                plane.payload = struct.pack("<I", len(latent)) + latent + struct.pack("<I", len(pixels)) + pixels
                if not options.raw_fallback:
                    continue
                choices.append((plane.mode, plane.payload))
            # The smallest of: the model, raw bits, and each classical codec allowed
            raw = pack_fields(plane.values.ravel(), np.full(plane.values.size, plane.bits))
            choices.append((PlaneMode.RAW, struct.pack("<I", len(raw)) + raw))
            if plane.bits <= CLASSICAL_MAX_BITS:
                for name in options.classical_planes:
                    try:
                        stream = _classical_encode(CLASSICAL_MODES[name], plane.values, plane.bits)
                    except Exception:  # a codec that refuses this plane is simply not a choice
                        continue
                    choices.append((CLASSICAL_MODES[name], struct.pack("<I", len(stream)) + stream))
            plane.mode, plane.payload = min(choices, key=lambda choice: len(choice[1]))

    _run_batches(run, _batches(varying, options.batch), options.workers)


def _version_needed(tiles: list[list[_Plane]], adaptation: bytes) -> int:
    modes = {p.mode for tile in tiles for p in tile}
    if adaptation or PlaneMode.JPEGXL_TILE in modes:
        return 3
    return 2 if modes & set(CLASSICAL_MODES.values()) else 1


def _joint_tiles(frames: np.ndarray, descriptor: Descriptor) -> list[_Plane | None]:
    """Per tile of a 3-sample stream: the whole tile as one JPEG XL codestream (None where libjxl
    refuses it).  Independent of the model, so the adaptation's size comparison can include it."""
    out: list[_Plane | None] = []
    for index in range(descriptor.frames * descriptor.tiles_per_frame):
        f, t = divmod(index, descriptor.tiles_per_frame)
        top, left, h, w = descriptor.tile_rect(t)
        region = frames[f, top : top + h, left : left + w, :]
        bits = max(1, int(region.max()).bit_length())
        region = np.ascontiguousarray(region, dtype=_sample_dtype(bits))
        try:
            stream = bytes(imagecodecs.jpegxl_encode(region, lossless=True, effort=7, bitspersample=bits, numthreads=1))
        except Exception:  # libjxl refusing this tile just leaves the planes as they are
            out.append(None)
            continue
        out.append(_Plane(region, 0, bits, PlaneMode.JPEGXL_TILE, struct.pack("<I", len(stream)) + stream))
    return out


def _tile_bytes(tile: list[_Plane], joint: _Plane | None) -> int:
    """A tile's coded size with the joint codestream where that is smaller."""
    own = sum(len(_pack_plane(p)) for p in tile)
    return own if joint is None else min(own, len(_pack_plane(joint)))


def _with_joint_tiles(
    tiles: list[list[_Plane]], joint: list[_Plane | None], *, version_paid: bool
) -> list[list[_Plane]]:
    """Tiles with the joint codestream wherever it is smaller.  Mode 5 needs format version 3, whose
    header holds 4 more bytes (the adaptation length): unless the stream is version 3 anyway, the
    joint tiles must save more than that in all."""
    chosen = [
        [j] if j is not None and len(_pack_plane(j)) < sum(len(_pack_plane(p)) for p in tile) else tile
        for tile, j in zip(tiles, joint, strict=True)
    ]
    saving = sum(len(_pack_plane(p)) for tile in tiles for p in tile) - sum(
        len(_pack_plane(p)) for tile in chosen for p in tile
    )
    return chosen if version_paid or saving > 4 else tiles


def _adapt(
    bundle: ModelBundle, tiles: list[list[_Plane]], joint: list[_Plane | None], options: CodecOptions
) -> tuple[bytes, list[list[_Plane]]]:
    """Single-image mode: (delta payload, tiles coded with the adapted model), or (b"", tiles)
    unchanged when the adaptation does not make the stream smaller (joint colour tiles, which do
    not depend on the model, counted on both sides)."""
    from lvpnet.train.adapt import AdaptSettings, fine_tune

    if not isinstance(bundle.exact, ExactContext):
        raise UnsupportedInputError(f"single-image mode needs a context model; {bundle.name!r} is not one")
    training = [(p.values, p.bits) for tile in tiles for p in tile if p.mode != PlaneMode.CONSTANT]
    sampler_state = {k: torch.from_numpy(v) for k, v in bundle.encoder_state.items()} or None
    payload = fine_tune(
        bundle.exact,
        training,
        AdaptSettings(steps=options.adapt_steps),
        sampler_state,
        require_gain=options.adapt_only_if_smaller,
    )
    if not payload:
        return b"", tiles
    adapted_tiles = [[_Plane(p.values, p.minimum, p.bits) for p in tile] for tile in tiles]
    _encode_planes(bundle.adapted(payload), [p for tile in adapted_tiles for p in tile], options)

    def size(planes: list[list[_Plane]]) -> int:
        return sum(_tile_bytes(tile, j) for tile, j in zip(planes, joint, strict=True))

    adapted_size = size(adapted_tiles) + 4 + len(payload)  # the u32 length + the payload, in the header
    if options.adapt_only_if_smaller and adapted_size >= size(tiles):
        return b"", tiles
    return payload, adapted_tiles


def _sample_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint8 if bits <= 8 else np.uint16)


def _plane_samples(values: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=_sample_dtype(bits))


def _classical_encode(mode: PlaneMode, values: np.ndarray, bits: int) -> bytes:
    samples = _plane_samples(values, bits)
    if mode == PlaneMode.JPEGLS:
        # CharLS's output estimate is too small for noise: give it the raw size and a margin
        return bytes(imagecodecs.jpegls_encode(samples, level=0, out=2 * samples.nbytes + 4096))
    return bytes(imagecodecs.jpegxl_encode(samples, lossless=True, effort=7, bitspersample=max(1, bits), numthreads=1))


def _classical_decode(mode: PlaneMode, data: bytes, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Integer-exact by construction (lossless JPEG-LS / JPEG XL modular); checked against the
    plane's (or the joint tile's (h, w, 3)) shape and bit depth here and against the frame's
    SHA-256 afterwards."""
    # Into a buffer of the plane's shape: a codestream declaring another size is refused before
    # the library allocates it (a few bytes of JPEG XL can declare gigapixels)
    out = np.empty(shape, dtype=_sample_dtype(bits))
    try:
        if mode == PlaneMode.JPEGLS:
            decoded = np.asarray(imagecodecs.jpegls_decode(data, out=out))
        else:
            decoded = np.asarray(imagecodecs.jpegxl_decode(data, numthreads=1, out=out))
    except Exception as exc:  # the libraries raise their own error types
        raise CorruptStreamError(
            f"{mode.name} plane could not be decoded to shape {shape}: {type(exc).__name__}"
        ) from exc
    if decoded.shape != shape or decoded.dtype != _sample_dtype(bits):
        raise CorruptStreamError(f"{mode.name} plane has shape {decoded.shape} {decoded.dtype}, expected {shape}")
    values = decoded.astype(np.int64)
    if values.size and int(values.max()) >> bits:
        raise CorruptStreamError(f"{mode.name} plane exceeds its {bits} bits")
    return values


def _run_batches(fn, batches: list[list[_Plane]], workers: int) -> None:  # type: ignore[no-untyped-def]
    if workers <= 1 or len(batches) <= 1:
        for batch in batches:
            fn(batch)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fn, b) for b in batches]:
            future.result()


def _pack_plane(plane: _Plane) -> bytes:
    head = struct.pack("<Bi", plane.mode, plane.minimum)
    if plane.mode == PlaneMode.CONSTANT:
        return head
    return head + struct.pack("<B", plane.bits) + plane.payload


# ------------------------------------------------------------------------------------ decode


@dataclass
class _PendingPlane:
    shape: tuple[int, int]
    minimum: int
    bits: int
    z_payload: bytes
    pixel_payload: bytes
    out: np.ndarray  # view to fill, (h, w) int64


def _guarded_decode(data: bytes, header: Header, frame_indices: Iterable[int], options: CodecOptions) -> np.ndarray:
    # The header and every chunk are CRC-checked, so damage that reaches here is a crafted or
    # colliding stream; whatever low-level error it provokes is reported as corruption.
    try:
        return _decode_frames(data, header, frame_indices, options)
    except (LVPNetError, MemoryError):
        raise
    except (ValueError, IndexError, OverflowError, struct.error, RuntimeError) as exc:
        raise CorruptStreamError(f"stream could not be decoded: {type(exc).__name__}: {exc}") from exc


def _decode_frames(data: bytes, header: Header, frame_indices: Iterable[int], options: CodecOptions) -> np.ndarray:
    d = header.descriptor
    if header.coder_version != CODER_VERSION:
        raise UnsupportedStreamError(
            f"stream was written with entropy coder {header.coder_version!r}; this reader has {CODER_VERSION!r}"
        )
    frame_indices = list(frame_indices)
    planes = np.zeros((len(frame_indices), d.rows, d.cols, d.samples), dtype=np.int64)
    pending: list[_PendingPlane] = []
    for slot, f in enumerate(frame_indices):
        for t, chunk_index in enumerate(header.frame_chunks(f)):
            top, left, h, w = d.tile_rect(t)
            body = memoryview(check_chunk(data, header, chunk_index))
            for s in range(d.samples):
                if s == 0 and d.samples == 3 and header.version >= 3 and body[:1] == bytes([PlaneMode.JPEGXL_TILE]):
                    body = _parse_joint_tile(body, d, planes[slot, top : top + h, left : left + w, :])
                    break
                target = planes[slot, top : top + h, left : left + w, s]
                body = _parse_plane(body, (h, w), target, pending, header.version)
            if len(body):
                raise CorruptStreamError(f"chunk {chunk_index} has {len(body)} trailing bytes")
    if pending:
        bundle = ZOO.get(header.codec_id, header.weights_sha256.hex())
        if header.adaptation:
            bundle = bundle.adapted(header.adaptation)
        _decode_model_planes(bundle, pending, options)
    if d.color == Color.RGB:
        planes = _inverse_rct(planes)
    lo, hi = {
        DType.UINT8: (0, 255),
        DType.INT8: (-128, 127),
        DType.UINT16: (0, 65535),
        DType.INT16: (-32768, 32767),
    }[d.dtype]
    if planes.size and (planes.min() < lo or planes.max() > hi):
        raise CorruptStreamError("decoded samples fall outside the stream's data type")
    out = planes.astype(d.dtype.numpy_name)
    for slot, f in enumerate(frame_indices):
        if sha256(_canonical_bytes(out[slot])) != header.frame_sha256[f]:
            raise CorruptStreamError(f"frame {f} does not match its SHA-256")
    return out


def _take(body: memoryview, n: int) -> tuple[bytes, memoryview]:
    if n > len(body):
        raise CorruptStreamError("chunk truncated")
    return bytes(body[:n]), body[n:]


def _read(body: memoryview, fmt: str) -> tuple[tuple[int, ...], memoryview]:
    raw, body = _take(body, struct.calcsize(fmt))
    return struct.unpack(fmt, raw), body


def _parse_joint_tile(body: memoryview, d: Descriptor, target: np.ndarray) -> memoryview:
    """A JPEGXL_TILE record: the tile's samples as the caller gave them, into `target` (h, w, 3)
    in the planes' domain (after the colour transform for RGB, which the frame undoes)."""
    (_mode, minimum, bits), body = _read(body, "<BiB")
    if minimum != 0 or not 1 <= bits <= 8 * d.dtype.itemsize or d.dtype not in (DType.UINT8, DType.UINT16):
        raise CorruptStreamError(f"JPEG XL tile record with minimum {minimum}, {bits} bits for {d.dtype.name}")
    (n,), body = _read(body, "<I")
    stream, body = _take(body, n)
    values = _classical_decode(PlaneMode.JPEGXL, stream, target.shape, bits)
    target[...] = _forward_rct(values) if d.color == Color.RGB else values
    return body


def _parse_plane(
    body: memoryview, shape: tuple[int, int], target: np.ndarray, pending: list[_PendingPlane], version: int
) -> memoryview:
    (mode, minimum), body = _read(body, "<Bi")
    if mode == PlaneMode.CONSTANT:
        target[...] = minimum
        return body
    known = (PlaneMode.RAW, PlaneMode.MODEL) + ((PlaneMode.JPEGLS, PlaneMode.JPEGXL) if version >= 2 else ())
    if mode not in known:
        raise CorruptStreamError(f"unknown plane mode {mode} in a version {version} stream")
    (bits,), body = _read(body, "<B")
    if not 1 <= bits <= 32:
        raise CorruptStreamError(f"invalid plane bit depth {bits}")
    if mode in (PlaneMode.JPEGLS, PlaneMode.JPEGXL):
        if bits > CLASSICAL_MAX_BITS:
            raise CorruptStreamError(f"{PlaneMode(mode).name} plane of {bits} bits")
        (n,), body = _read(body, "<I")
        stream, body = _take(body, n)
        target[...] = _classical_decode(PlaneMode(mode), stream, shape, bits) + minimum
        return body
    if mode == PlaneMode.RAW:
        (n,), body = _read(body, "<I")
        raw, body = _take(body, n)
        count = shape[0] * shape[1]
        if n != (count * bits + 7) // 8:
            raise CorruptStreamError("raw plane has the wrong length")
        target[...] = unpack_fields(raw, np.full(count, bits)).astype(np.int64).reshape(shape) + minimum
        return body
    (nz,), body = _read(body, "<I")
    z_payload, body = _take(body, nz)
    (npix,), body = _read(body, "<I")
    pixel_payload, body = _take(body, npix)
    pending.append(_PendingPlane(shape, minimum, bits, z_payload, pixel_payload, target))
    return body


def _decode_model_planes(bundle: ModelBundle, pending: list[_PendingPlane], options: CodecOptions) -> None:
    coder = bundle.plane_coder()
    by_shape: dict[tuple[int, int], list[_PendingPlane]] = defaultdict(list)
    for plane in pending:
        by_shape[plane.shape].append(plane)
    step = max(1, options.batch)
    batches = [g[i : i + step] for g in by_shape.values() for i in range(0, len(g), step)]

    def run(batch: list[_PendingPlane]) -> None:
        bits = np.array([p.bits for p in batch])
        payloads = [(p.z_payload, p.pixel_payload) for p in batch]
        values = coder.decode(payloads, batch[0].shape, bits, options)
        for plane, plane_values in zip(batch, values, strict=True):
            plane.out[...] = plane_values + plane.minimum

    _run_batches(run, batches, options.workers)  # type: ignore[arg-type]
