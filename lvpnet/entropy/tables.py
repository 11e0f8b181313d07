"""Integer CDF tables for the discretised Laplace pixel model, and the parameter -> table mapping.

The decoder never evaluates a transcendental function: a pixel's distribution is selected from
integer frequency tables by two integers, the mean in 1/16 sample units (``mu16``) and a scale
index ``J`` on a 1/8-octave grid.  The tables are built once, by :func:`build_laplace_tables`
(the only place with ``exp``), stored with the model weights, and read back as integers.

Scales beyond the tabulated range are handled by splitting the sample: the top part
``x >> k`` is coded with a table whose scale is ``s / 2**k`` (always tabulated) and the low
``k`` bits are written raw; for wide distributions the low bits are nearly uniform, so the
cost is within a few thousandths of a bit of coding the whole value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: scale index J maps to s_J = 2 ** (J / LEVELS_PER_OCTAVE - SCALE_OCTAVE_OFFSET)
LEVELS_PER_OCTAVE = 8
SCALE_OCTAVE_OFFSET = 3
#: indices in [0, TABLE_SCALES) are tabulated (s from 0.125 to ~7.3 samples)
TABLE_SCALES = 48
#: largest scale index accepted (s ~ 2**18, beyond any 16-bit residual)
MAX_SCALE_INDEX = TABLE_SCALES + LEVELS_PER_OCTAVE * 15 - 1
#: mean resolution: 1/16 sample
MEAN_FRACTION_BITS = 4
MEAN_FRACTIONS = 1 << MEAN_FRACTION_BITS
#: residuals in [-HALF_WIDTH, HALF_WIDTH] are table symbols; outside is an escape
HALF_WIDTH = 64
ALPHABET = 2 * HALF_WIDTH + 3  # escape-low, 2*HALF_WIDTH+1 residuals, escape-high
#: frequencies of each table sum to 2**TABLE_PRECISION
TABLE_PRECISION = 16
TABLES_VERSION = 1


@dataclass(frozen=True)
class LaplaceTables:
    """Integer frequency tables, shape (TABLE_SCALES * MEAN_FRACTIONS, ALPHABET), rows summing to 2**16."""

    frequencies: np.ndarray

    def __post_init__(self) -> None:
        expected = (TABLE_SCALES * MEAN_FRACTIONS, ALPHABET)
        if self.frequencies.shape != expected:
            raise ValueError(f"tables have shape {self.frequencies.shape}, expected {expected}")
        if self.frequencies.min() < 1:
            raise ValueError("every symbol needs a nonzero frequency")
        if not np.all(self.frequencies.sum(axis=1) == (1 << TABLE_PRECISION)):
            raise ValueError("every table must sum to 2**TABLE_PRECISION")

    def probabilities(self) -> np.ndarray:
        """The one conversion from integer frequencies to coder probabilities: float64, exact."""
        # A power-of-two denominator makes every quotient exact in float64.
        return self.frequencies.astype(np.float64) / float(1 << TABLE_PRECISION)


def _laplace_cdf(t: np.ndarray, scale: float) -> np.ndarray:
    return np.where(t < 0, 0.5 * np.exp(t / scale), 1.0 - 0.5 * np.exp(-t / scale))


def build_laplace_tables() -> LaplaceTables:
    """Build the integer tables (explicit step; the result is stored with the weights)."""
    total = 1 << TABLE_PRECISION
    rows = []
    edges = np.arange(-HALF_WIDTH, HALF_WIDTH + 2, dtype=np.float64) - 0.5
    for j in range(TABLE_SCALES):
        scale = 2.0 ** (j / LEVELS_PER_OCTAVE - SCALE_OCTAVE_OFFSET)
        for f in range(MEAN_FRACTIONS):
            cdf = _laplace_cdf(edges - f / MEAN_FRACTIONS, scale)
            mass = np.concatenate([[cdf[0]], np.diff(cdf), [1.0 - cdf[-1]]])
            freq = _quantise_masses(mass, total)
            rows.append(freq)
    return LaplaceTables(np.stack(rows).astype(np.uint32))


def _quantise_masses(mass: np.ndarray, total: int) -> np.ndarray:
    """Integer frequencies >= 1 summing to `total`, close to `mass * total`."""
    mass = np.maximum(mass, 0.0)
    spare = total - len(mass)
    freq = 1 + np.floor(mass / mass.sum() * spare).astype(np.int64)
    # Hand the rounding remainder to the largest symbols (deterministic: argsort is stable).
    remainder = total - int(freq.sum())
    order = np.argsort(-mass, kind="stable")
    freq[order[:remainder]] += 1
    return freq


def split_scale_index(scale_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map scale indices J to (tabulated index j, raw low-bit count k) with s_J = s_j * 2**k."""
    scale_index = np.asarray(scale_index, dtype=np.int64)
    over = np.maximum(scale_index - (TABLE_SCALES - LEVELS_PER_OCTAVE), 0)
    k = over // LEVELS_PER_OCTAVE
    return scale_index - LEVELS_PER_OCTAVE * k, k


def table_index(mu16: np.ndarray, scale_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each sample: (table row, centre in coarse units, raw low-bit count k).

    All integer arithmetic; encoder and decoder call exactly this.
    """
    j, k = split_scale_index(scale_index)
    mu16 = np.asarray(mu16, dtype=np.int64)
    # The coarse symbol floor(x / 2**k) has its mass centred 0.5 - 2**-(k+1) below the
    # scaled mean; shift by that (in 1/16 units) so wide distributions stay centred.
    half = MEAN_FRACTIONS // 2
    coarse_mu16 = (mu16 >> k) - (half - (half >> k))
    centre = coarse_mu16 >> MEAN_FRACTION_BITS
    fraction = coarse_mu16 & (MEAN_FRACTIONS - 1)
    return j * MEAN_FRACTIONS + fraction, centre, k
