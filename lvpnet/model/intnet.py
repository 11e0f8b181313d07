"""Exact integer convolutions: the decode path's arithmetic.

Activations are integers A representing A / 2**F; weights are integers W representing
W / 2**weight_bits.  A convolution accumulates A * W in floating point only where every
partial sum is provably an integer below 2**53 (float64) or 2**24 (float32), checked per layer
from the declared input bound when the layer is built: then any summation order, thread count
or BLAS kernel gives the same result.  Rescaling is a floor division by a power of two (exact),
followed by a clamp that keeps the next layer's bound valid.  oneDNN/cuDNN are switched off
for these layers because their Winograd/FFT algorithms leave the integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lvpnet.errors import WeightsError

EXACT_FLOAT64 = 2**53
EXACT_FLOAT32 = 2**24


@dataclass
class IntConv:
    """One exact convolution: out = clamp(floor((conv(A, W) + B) / 2**shift), lo, hi)."""

    weight: np.ndarray  # int64 (out, in, kh, kw)
    bias: np.ndarray  # int64 (out,)
    shift: np.ndarray  # int64 (out,), >= 0
    padding: int
    in_bound: int  # |A| <= in_bound for every input
    lo: int
    hi: int

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.int64)
        self.bias = np.asarray(self.bias, dtype=np.int64)
        self.shift = np.asarray(self.shift, dtype=np.int64)
        out_channels = self.weight.shape[0]
        if self.bias.shape != (out_channels,) or self.shift.shape != (out_channels,):
            raise WeightsError("integer layer bias/shift do not match its weight")
        if (self.shift < 0).any() or (self.shift > 62).any():
            raise WeightsError("integer layer shift out of range")
        self.accumulator_bound = self._accumulator_bound()
        if self.accumulator_bound >= EXACT_FLOAT64:
            raise WeightsError(f"integer layer may reach {self.accumulator_bound} >= 2**53: not exact in float64")
        self.exact_in_float32 = self.accumulator_bound < EXACT_FLOAT32 and self.in_bound < EXACT_FLOAT32
        self._cache: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}

    def _accumulator_bound(self, in_bound: int | None = None) -> int:
        # Largest |partial sum| of any output: every product and the bias at their extremes.
        in_bound = self.in_bound if in_bound is None else in_bound
        per_output = np.abs(self.weight).reshape(self.weight.shape[0], -1).sum(axis=1)
        worst = [int(s) * in_bound + abs(int(b)) for s, b in zip(per_output, self.bias, strict=True)]
        return max(worst, default=0)

    def _float32_is_exact(self, x: torch.Tensor) -> bool:
        """Data-dependent proof: with this input's actual max |A|, every partial sum < 2**24."""
        if x.numel() == 0:
            return True
        actual = int(x.abs().max().item())
        return actual < EXACT_FLOAT32 and self._accumulator_bound(actual) < EXACT_FLOAT32

    @property
    def out_bound(self) -> int:
        return max(abs(self.lo), abs(self.hi))

    def _tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = (
                torch.from_numpy(self.weight).to(device=device, dtype=dtype),
                torch.from_numpy(self.bias).to(device=device, dtype=dtype).view(1, -1, 1, 1),
                torch.from_numpy(2.0 ** (-self.shift.astype(np.float64)))
                .to(device=device, dtype=dtype)
                .view(1, -1, 1, 1),
            )
        return self._cache[key]

    def __call__(self, x: torch.Tensor, compute: str = "float64") -> torch.Tensor:
        """`x` holds integers (any float dtype); returns integers as float64.

        compute="float64" always accumulates in float64; "auto" uses float32 when this input
        provably keeps every partial sum below 2**24, float64 otherwise.
        """
        if compute not in ("float64", "auto"):
            raise ValueError(f"unknown compute mode {compute!r}")
        use_float32 = compute == "auto" and (self.exact_in_float32 or self._float32_is_exact(x))
        dtype = torch.float32 if use_float32 else torch.float64
        if x.device.type != "cpu":
            dtype = torch.float64  # GPU float32 GEMMs may run in TF32; float64 never does
        weight, bias, scale = self._tensors(dtype, x.device)
        acc = _conv_gemm(x.to(dtype), weight, self.padding)
        # Both the bias add and the power-of-two scaling are exact within the checked bound.  In
        # place on the fresh product: the same operations in the same order, fewer passes of allocation.
        acc = acc.add_(bias).to(torch.float64)
        return acc.mul_(scale.to(torch.float64)).floor_().clamp_(self.lo, self.hi)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}.weight": self.weight,
            f"{prefix}.bias": self.bias,
            f"{prefix}.shift": self.shift,
            f"{prefix}.meta": np.array([self.padding, self.in_bound, self.lo, self.hi], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> IntConv:
        try:
            padding, in_bound, lo, hi = (int(v) for v in arrays[f"{prefix}.meta"])
            return cls(
                arrays[f"{prefix}.weight"],
                arrays[f"{prefix}.bias"],
                arrays[f"{prefix}.shift"],
                padding,
                in_bound,
                lo,
                hi,
            )
        except KeyError as exc:
            raise WeightsError(f"weights lack integer layer {prefix!r}") from exc


def _conv_gemm(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """Convolution as im2col + one matrix product: only multiply-adds of the integers themselves,
    never a Winograd/FFT transform whose intermediate values are not integers."""
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    matrix = weight.reshape(out_channels, -1)
    pointwise = kh == kw == 1
    columns = x.reshape(batch, x.shape[1], height * width) if pointwise else F.unfold(x, (kh, kw), padding=padding)
    out = torch.matmul(matrix, columns)
    out_h = height + 2 * padding - kh + 1
    out_w = width + 2 * padding - kw + 1
    return out.reshape(batch, out_channels, out_h, out_w)


def quantise_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    in_fraction_bits: int,
    out_fraction_bits: int | list[int],
    weight_bits: int,
    in_bound: int,
    out_limit: float,
    relu: bool,
    input_scale: float = 1.0,
) -> IntConv:
    """Convert a float conv (on inputs `input_scale * A / 2**in_fraction_bits`) to an IntConv.

    `out_limit` is the real-valued clamp of the output (training clamps the same way).
    """
    w = weight.detach().double().cpu().numpy() * input_scale
    out_channels = w.shape[0]
    b = np.zeros(out_channels) if bias is None else bias.detach().double().cpu().numpy()
    out_bits = np.broadcast_to(np.asarray(out_fraction_bits, dtype=np.int64), (out_channels,))
    shift = in_fraction_bits + weight_bits - out_bits
    if (shift < 0).any():
        raise WeightsError("output fraction bits exceed input + weight fraction bits")
    int_weight = np.round(w * 2.0**weight_bits).astype(np.int64)
    int_bias = np.round(b * 2.0 ** (weight_bits + in_fraction_bits)).astype(np.int64)
    # One clamp per layer: the widest channel's limit (all outputs share the range in training).
    hi = int(np.floor(out_limit * 2.0 ** int(out_bits.max())))
    lo = 0 if relu else -hi
    padding = weight.shape[-1] // 2
    return IntConv(int_weight, int_bias, shift, padding, in_bound, lo, hi)
