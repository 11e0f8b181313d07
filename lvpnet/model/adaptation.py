"""Single-image mode, decoder side: a per-stream integer delta on the context model's step networks.

The encoder may fine-tune the step networks on the image it codes (`lvpnet.train.adapt`) and store
the change of their integer weights in the stream.  The delta lives entirely in the integer domain
the decoder already uses: for each adapted tensor, `new = base + (q << shift)` with small integers
q, so applying it is exact, needs no float, and gives the same layers on every machine.  Every
byte of it is in the stream header (counted in the stream's bits per sample).

Payload (format 1), all integers little-endian:

    u8  format (1)
    u32 mask: bit i set when slot i is adapted; slots are the sorted step layers, weight then bias
    per set slot, in slot order: u8 shift, u8 k (exp-Golomb order)
    bit stream (MSB first, zero-padded to a byte): per set slot, every q of the tensor in C order,
      as the order-k exp-Golomb code of zigzag(q)

A payload that does not parse, leaves bytes over, or gives layers outside the exact-arithmetic
bounds raises CorruptStreamError: a damaged or crafted delta never reaches the pixel decoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import numpy as np

from lvpnet.entropy.bits import BitReader, expgolomb_k_encode, expgolomb_k_lengths, pack_bits
from lvpnet.errors import CorruptStreamError, WeightsError
from lvpnet.model.context_coding import ExactContext
from lvpnet.model.intnet import IntConv

ADAPTATION_FORMAT = 1
#: largest |q| and shift a payload may carry: a delta of this size already breaks the exact bounds
MAX_DELTA = (1 << 24) - 1
MAX_SHIFT = 30
MAX_ORDER = 12
PARTS = ("weight", "bias")


@dataclass(frozen=True)
class TensorDelta:
    slot: int
    shift: int
    q: np.ndarray  # int64, the tensor's shape


def adaptable_slots(exact: ExactContext) -> list[tuple[str, str]]:
    """(layer, part) of every tensor a delta may change: the step networks' weights and biases."""
    layers = sorted(name for name in exact.layers if name.startswith("steps."))
    return [(layer, part) for layer in layers for part in PARTS]


def _zigzag(q: np.ndarray) -> np.ndarray:
    q = q.astype(np.int64).ravel()
    return np.where(q >= 0, 2 * q, -2 * q - 1).astype(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return np.where(u & 1, -((u + 1) >> 1), u >> 1)


def best_order(q: np.ndarray) -> int:
    """The exp-Golomb order that codes these values in the fewest bits."""
    u = _zigzag(q)
    costs = [int(expgolomb_k_lengths(u, k).sum()) for k in range(MAX_ORDER + 1)]
    return int(np.argmin(costs))


def pack_delta(exact: ExactContext, deltas: list[TensorDelta]) -> bytes:
    """The payload for these tensor deltas (all-zero tensors are left out)."""
    slots = adaptable_slots(exact)
    deltas = sorted((d for d in deltas if np.any(d.q)), key=lambda d: d.slot)
    mask = 0
    table = b""
    codes, lengths = [], []
    for delta in deltas:
        layer, part = slots[delta.slot]
        expected = getattr(exact.layers[layer], part).shape
        if delta.q.shape != expected:
            raise ValueError(f"delta for {layer}.{part} has shape {delta.q.shape}, expected {expected}")
        if int(np.abs(delta.q).max()) > MAX_DELTA or not 0 <= delta.shift <= MAX_SHIFT:
            raise ValueError(f"delta for {layer}.{part} out of range")
        if mask >> delta.slot & 1:
            raise ValueError(f"two deltas for slot {delta.slot}")
        mask |= 1 << delta.slot
        k = best_order(delta.q)
        table += struct.pack("<BB", delta.shift, k)
        c, n = expgolomb_k_encode(_zigzag(delta.q), k)
        codes.append(c)
        lengths.append(n)
    if not deltas:
        return b""
    bits = pack_bits(np.concatenate(codes), np.concatenate(lengths))
    return struct.pack("<BI", ADAPTATION_FORMAT, mask) + table + bits


def apply_delta(exact: ExactContext, payload: bytes) -> ExactContext:
    """The adapted integer model a stream's delta describes; CorruptStreamError if it is invalid."""
    slots = adaptable_slots(exact)
    if len(payload) < 5:
        raise CorruptStreamError("adaptation payload truncated")
    version, mask = struct.unpack_from("<BI", payload)
    if version != ADAPTATION_FORMAT:
        raise CorruptStreamError(f"unknown adaptation format {version}")
    if mask == 0 or mask >> len(slots):
        raise CorruptStreamError("adaptation mask names no tensor or tensors the model does not have")
    present = [i for i in range(len(slots)) if mask >> i & 1]
    table_end = 5 + 2 * len(present)
    if len(payload) < table_end:
        raise CorruptStreamError("adaptation table truncated")
    reader = BitReader(payload[table_end:])
    changes: dict[str, dict[str, np.ndarray]] = {}
    for n, slot in enumerate(present):
        shift, k = payload[5 + 2 * n], payload[6 + 2 * n]
        if shift > MAX_SHIFT or k > MAX_ORDER:
            raise CorruptStreamError(f"adaptation shift {shift} or order {k} out of range")
        layer, part = slots[slot]
        base = getattr(exact.layers[layer], part)
        if base.size > reader.nbits - reader.pos:
            raise CorruptStreamError("adaptation bit stream truncated")
        u = np.array([reader.read_expgolomb_k(k) for _ in range(base.size)], dtype=np.int64)
        q = _unzigzag(u)
        if q.size and int(np.abs(q).max()) > MAX_DELTA:
            raise CorruptStreamError("adaptation delta out of range")
        changes.setdefault(layer, {})[part] = base + (q << shift).reshape(base.shape)
    reader.check_padding()
    if reader.bytes_used() != len(payload) - table_end:
        raise CorruptStreamError("adaptation payload has trailing bytes")
    layers = dict(exact.layers)
    try:
        for layer, parts in changes.items():
            layers[layer] = replace(exact.layers[layer], **parts)  # re-runs IntConv's bound checks
    except WeightsError as exc:
        raise CorruptStreamError(f"adapted weights leave the exact-arithmetic bounds: {exc}") from exc
    return ExactContext(layers, exact.config)


def delta_between(base: ExactContext, adapted: dict[str, IntConv], shifts: dict[str, int]) -> list[TensorDelta]:
    """Quantise (adapted - base) per slot to multiples of 2**shift (shift by part: 'weight'/'bias:fc1'...).

    `shifts` maps a slot key (see `slot_key`) to its shift; the rounding is to nearest.
    """
    out = []
    for slot, (layer, part) in enumerate(adaptable_slots(base)):
        shift = shifts[slot_key(layer, part)]
        diff = getattr(adapted[layer], part) - getattr(base.layers[layer], part)
        q = np.floor_divide(diff + (1 << shift >> 1), 1 << shift)
        q = np.clip(q, -MAX_DELTA, MAX_DELTA)
        out.append(TensorDelta(slot, shift, q.astype(np.int64)))
    return out


def slot_key(layer: str, part: str) -> str:
    """'weight', or 'bias:fcN': tensors of one key share a quantisation step in float units."""
    return part if part == "weight" else f"bias:{layer.rsplit('.', 1)[-1]}"
