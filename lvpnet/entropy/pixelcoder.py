"""The coder proxy: pixels + integer distribution parameters <-> bytes, through constriction's ANS.

Symbols are grouped by table (one `encode_reverse` call per table and step, never one
probability row per symbol), models are built once per table from the stored integer
frequencies converted one way only (float64, exact, ``perfect=False``), and the coder's
version is recorded in every stream by the container.

Payload of one plane (little endian):
    u32 n_words | n_words x u32 ANS words | u32 n_low | low-bit bytes | u32 n_escape | escape bytes
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

import constriction
import numpy as np

from lvpnet.entropy.fields import pack_escapes, pack_fields, unpack_escapes, unpack_fields
from lvpnet.entropy.tables import ALPHABET, HALF_WIDTH, MAX_SCALE_INDEX, LaplaceTables, table_index
from lvpnet.errors import CorruptStreamError

#: Recorded in every stream: a different constriction version may not reproduce the bits.
CODER_VERSION = f"constriction=={version('constriction')};ans32"


@dataclass
class StepParams:
    """Distribution parameters of the samples coded in one step, in coding order."""

    mu16: np.ndarray  # int64, mean in 1/16 sample units, >= 0
    scale_index: np.ndarray  # int64 in [0, MAX_SCALE_INDEX]


class _Symbols:
    """Per-step derived integer quantities shared by encoder and decoder."""

    def __init__(self, params: StepParams) -> None:
        scale_index = np.clip(params.scale_index, 0, MAX_SCALE_INDEX)
        mu16 = np.maximum(params.mu16, 0)
        self.table, self.centre, self.low_bits = table_index(mu16, scale_index)
        self.order = np.argsort(self.table, kind="stable")
        tables, starts, counts = np.unique(self.table[self.order], return_index=True, return_counts=True)
        self.groups = list(zip(tables.tolist(), starts.tolist(), counts.tolist(), strict=True))


class PixelCoder:
    """Encodes and decodes steps of samples with the integer Laplace tables."""

    def __init__(self, tables: LaplaceTables) -> None:
        self._probabilities = tables.probabilities()
        self._models: dict[int, constriction.stream.model.Categorical] = {}
        # Code lengths for the encoder's parameter search only (never on the decode path).
        self._cost = -np.log2(self._probabilities)

    def estimate_bits(self, values: np.ndarray, params: StepParams) -> float:
        """Approximate code length of one step's samples (table cost + raw low bits + escapes)."""
        symbols = _Symbols(params)
        x = np.asarray(values, dtype=np.int64)
        residual = (x >> symbols.low_bits) - symbols.centre
        symbol = np.clip(residual + HALF_WIDTH + 1, 0, ALPHABET - 1)
        escaped = (symbol == 0) | (symbol == ALPHABET - 1)
        escape_bits = 6 + 2 * np.log2(np.abs(residual[escaped]) - HALF_WIDTH + 1).sum() if escaped.any() else 0.0
        return float(self._cost[symbols.table, symbol].sum() + symbols.low_bits.sum() + escape_bits)

    def _model(self, row: int) -> constriction.stream.model.Categorical:
        model = self._models.get(row)
        if model is None:
            model = constriction.stream.model.Categorical(self._probabilities[row], perfect=False)
            self._models[row] = model
        return model

    def encode(self, values: Sequence[np.ndarray], params: Sequence[StepParams]) -> bytes:
        """Encode steps of non-negative integer samples; decoding must present the same params."""
        coder = constriction.stream.stack.AnsCoder()
        low_values, low_lengths, escapes = [], [], []
        prepared = []
        for step_values, step_params in zip(values, params, strict=True):
            symbols = _Symbols(step_params)
            x = np.asarray(step_values, dtype=np.int64)
            coarse = x >> symbols.low_bits
            low_values.append(x & ((np.int64(1) << symbols.low_bits) - 1))
            low_lengths.append(symbols.low_bits)
            residual = coarse - symbols.centre
            symbol = np.clip(residual + HALF_WIDTH + 1, 0, ALPHABET - 1)
            escapes.append(
                np.where(symbol == 0, -HALF_WIDTH - 1 - residual, residual - HALF_WIDTH - 1)[
                    (symbol == 0) | (symbol == ALPHABET - 1)
                ]
            )
            prepared.append((symbols, symbol.astype(np.int32)))
        # ANS is a stack: encode in the reverse of the decoding order.
        for symbols, symbol in reversed(prepared):
            ordered = symbol[symbols.order]
            for row, start, count in reversed(symbols.groups):
                coder.encode_reverse(ordered[start : start + count], self._model(row))
        words = coder.get_compressed().astype("<u4")
        low = pack_fields(np.concatenate(low_values or [np.zeros(0)]), np.concatenate(low_lengths or [[]]))
        escape_values = np.concatenate(escapes or [np.zeros(0)])
        escape = struct.pack("<I", len(escape_values)) + pack_escapes(escape_values)
        return b"".join(
            [
                struct.pack("<I", len(words)),
                words.tobytes(),
                struct.pack("<I", len(low)),
                low,
                struct.pack("<I", len(escape)),
                escape,
            ]
        )

    def decoder(self, payload: bytes) -> PixelDecoder:
        return PixelDecoder(self, payload)


class PixelDecoder:
    """Decodes steps one at a time: later steps' parameters may depend on earlier samples."""

    def __init__(self, coder: PixelCoder, payload: bytes) -> None:
        self._coder = coder
        view = memoryview(payload)
        words, view = _take_block(view, 4, "ANS words")
        self._low, view = _take_block(view, 1, "low bits")
        self._escape, view = _take_block(view, 1, "escapes")
        if len(view):
            raise CorruptStreamError(f"{len(view)} unexpected bytes after the pixel payload")
        compressed = np.frombuffer(words, dtype="<u4").astype(np.uint32)
        self._ans = constriction.stream.stack.AnsCoder(compressed)
        self._low_position = 0  # in bits
        self._escape_values: np.ndarray | None = None
        self._escapes_used = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def decode_step(self, params: StepParams) -> np.ndarray:
        """Decode the next step.  Escaped samples are resolved in :meth:`finish_escapes` order."""
        symbols = _Symbols(params)
        n = len(symbols.table)
        ordered = np.empty(n, dtype=np.int64)
        try:
            for row, start, count in symbols.groups:
                ordered[start : start + count] = self._ans.decode(self._coder._model(row), count)
        except Exception as exc:  # constriction raises plain errors on exhausted/invalid data
            raise CorruptStreamError(f"entropy decoding failed: {exc}") from exc
        symbol = np.empty(n, dtype=np.int64)
        symbol[symbols.order] = ordered
        residual = symbol - HALF_WIDTH - 1
        low_start = self._low_position
        self._low_position += int(symbols.low_bits.sum())
        escaped = (symbol == 0) | (symbol == ALPHABET - 1)
        values = self._resolve_escapes(symbol, residual, escaped) if escaped.any() else residual
        low = self._read_low(low_start, symbols.low_bits)
        return ((symbols.centre + values) << symbols.low_bits) | low

    def _resolve_escapes(self, symbol: np.ndarray, residual: np.ndarray, escaped: np.ndarray) -> np.ndarray:
        # Escapes are packed in coding order across steps, preceded by their total count.
        if self._escape_values is None:
            if len(self._escape) < 4:
                raise CorruptStreamError("escape section truncated")
            (total,) = struct.unpack_from("<I", self._escape)
            if total > len(self._escape) * 8:
                raise CorruptStreamError("escape count exceeds the escape section")
            self._escape_values = unpack_escapes(bytes(self._escape[4:]), total).astype(np.int64)
        count = int(escaped.sum())
        extra = self._escape_values[self._escapes_used : self._escapes_used + count]
        if len(extra) != count:
            raise CorruptStreamError("more escaped samples than escape values")
        self._escapes_used += count
        low_side = symbol[escaped] == 0
        out = residual.copy()
        out[escaped] = np.where(low_side, -HALF_WIDTH - 1 - extra, HALF_WIDTH + 1 + extra)
        return out

    def _read_low(self, start: int, lengths: np.ndarray) -> np.ndarray:
        if not lengths.any():
            return np.zeros(len(lengths), dtype=np.int64)
        # Fields are bit-aligned: unpack from the containing byte and skip the leading bits.
        first_byte = start // 8
        skip = start - first_byte * 8
        lengths_with_skip = np.concatenate([[skip], lengths])
        values = unpack_fields(bytes(self._low[first_byte:]), lengths_with_skip)
        return values[1:].astype(np.int64)

    def finish(self) -> None:
        """Check the whole payload was consumed (a mismatch means a damaged stream)."""
        if not self._ans.is_empty():
            raise CorruptStreamError("entropy coder has unread data")
        if (self._low_position + 7) // 8 != len(self._low):
            raise CorruptStreamError("raw low-bit section has the wrong length")
        used = 0 if self._escape_values is None else len(self._escape_values)
        if self._escapes_used != used or (self._escape_values is None and len(self._escape) != 4):
            raise CorruptStreamError("escape section has unused values")


def _take_block(view: memoryview, item_size: int, what: str) -> tuple[memoryview, memoryview]:
    if len(view) < 4:
        raise CorruptStreamError(f"pixel payload truncated before the {what} length")
    (count,) = struct.unpack_from("<I", view)
    end = 4 + count * item_size
    if end > len(view):
        raise CorruptStreamError(f"pixel payload truncated in the {what}")
    return view[4:end], view[end:]
