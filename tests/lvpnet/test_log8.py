"""lvpnet.model.context.log8: the decoder's integer log, against an independent integer oracle."""

from __future__ import annotations

import numpy as np
import torch

from lvpnet.model.context import LOG_LUT, log8


def _oracle(values: np.ndarray) -> np.ndarray:
    """8 * floor(log2 a) + LUT[8 bits below the leading one], by Python integers only."""
    out = []
    for a in (max(1, int(v)) for v in values):
        exponent = a.bit_length() - 1
        mantissa = (a >> (exponent - 8) if exponent >= 8 else a << (8 - exponent)) & 255
        out.append(8 * exponent + int(LOG_LUT[mantissa]))
    return np.array(out, dtype=np.int64)


def test_every_value_up_to_2_pow_18() -> None:
    values = np.arange(-3, 1 << 18, dtype=np.int64)  # <= 0 is clamped to 1
    assert np.array_equal(log8(torch.from_numpy(values)).numpy(), _oracle(values))


def test_powers_of_two_neighbours_and_the_wide_path() -> None:
    edges = [v for k in range(1, 63) for v in ((1 << k) - 1, 1 << k, (1 << k) + 1) if v < 2**63]
    rng = np.random.default_rng(5)
    values = np.array(edges + list(rng.integers(1, 2**62, 2000)), dtype=np.int64)
    small = values[values < 2**53]
    assert np.array_equal(log8(torch.from_numpy(small)).numpy(), _oracle(small))  # frexp path
    assert np.array_equal(log8(torch.from_numpy(values)).numpy(), _oracle(values))  # shift path (max >= 2**53)
