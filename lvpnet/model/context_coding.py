"""Exact integer twin of the context model and its plane coder (shared by encoder and decoder)."""

from __future__ import annotations

import numpy as np
import torch

from lvpnet.entropy.latent import decode_latent, encode_latent
from lvpnet.entropy.pixelcoder import PixelCoder, StepParams
from lvpnet.errors import CorruptStreamError
from lvpnet.model.context import (
    FEATURE_BITS,
    FEATURE_LIMIT,
    HIDDEN_BITS,
    HIDDEN_LIMIT,
    OUT_BITS,
    OUT_LIMIT,
    STEP_TYPES,
    WEIGHT_BITS,
    ContextConfig,
    ContextLVPNet,
    coding_params,
    context_features,
    gather_context,
    latent_cells,
    level_schedule,
    log8,
    step_targets,
)
from lvpnet.model.intnet import IntConv, quantise_conv
from lvpnet.model.plane_coding import ExecutionOptions, check_range, normalised_padded, padded_shape

Z_WEIGHT_BITS = 24
Z_LIMIT = 2**20
#: per-plane scale adaptation: one offset per step type, in 1/8 octave, stored as a byte each
SCALE_OFFSET_MIN, SCALE_OFFSET_MAX = -8, 7


def _apply_offsets(params: list[StepParams], kinds: list[int], offsets: list[int]) -> list[StepParams]:
    # kinds[i] is the step type of params[i]; -1 (the first sample) keeps its parameters.
    return [p if k < 0 else StepParams(p.mu16, p.scale_index + offsets[k]) for p, k in zip(params, kinds, strict=True)]


class ExactContext:
    """Integer layers: steps.{D,H,V}.fc{1,2,3} and (with a latent) latent.conv{1,2}."""

    def __init__(self, layers: dict[str, IntConv], config: ContextConfig) -> None:
        self.layers, self.config = layers, config

    def _net(self, step: str, x: torch.Tensor, compute: str) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers[f"steps.{step}.fc1"](x, compute)
        h = self.layers[f"steps.{step}.fc2"](h, compute)
        out = self.layers[f"steps.{step}.fc3"](h, compute).to(torch.int64)
        return out[:, 0], out[:, 1]

    def latent_map(self, z: np.ndarray, compute: str, device: str) -> torch.Tensor:
        x = torch.from_numpy(np.clip(z, -Z_LIMIT, Z_LIMIT).astype(np.float64)).to(device)
        h = self.layers["latent.conv1"](x, compute)
        return self.layers["latent.conv2"](h, compute).to(torch.int64)

    def step(
        self,
        known: torch.Tensor,
        h: int,
        w: int,
        s: int,
        step: str,
        bits: torch.Tensor,
        latent: torch.Tensor | None,
        compute: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        neighbours, p16, activity = gather_context(known, h, w, s, step)
        log_unit = log8(activity + 1)
        cells = None if latent is None else latent_cells(latent, h, w, s, step, self.config.latent_stride)
        features = context_features(neighbours, p16, activity, bits, level_index(s), log_unit, cells)
        mean_out, scale_out = self._net(step, features, compute)  # the first layer converts to its float type
        return coding_params(p16, activity, mean_out, scale_out, bits, log_unit)


def level_index(s: int) -> int:
    return int(np.log2(s)) - 1


def export_context(model: ContextLVPNet) -> ExactContext:
    cfg = model.config
    layers: dict[str, IntConv] = {}
    hidden_bound = int(HIDDEN_LIMIT * 2**HIDDEN_BITS)
    for step in STEP_TYPES:
        net = model.steps[step]
        layers[f"steps.{step}.fc1"] = quantise_conv(
            net.fc1.weight,
            net.fc1.bias,
            in_fraction_bits=FEATURE_BITS,
            out_fraction_bits=HIDDEN_BITS,
            weight_bits=WEIGHT_BITS,
            in_bound=FEATURE_LIMIT,
            out_limit=HIDDEN_LIMIT,
            relu=True,
        )
        layers[f"steps.{step}.fc2"] = quantise_conv(
            net.fc2.weight,
            net.fc2.bias,
            in_fraction_bits=HIDDEN_BITS,
            out_fraction_bits=HIDDEN_BITS,
            weight_bits=WEIGHT_BITS,
            in_bound=hidden_bound,
            out_limit=HIDDEN_LIMIT,
            relu=True,
        )
        layers[f"steps.{step}.fc3"] = quantise_conv(
            net.fc3.weight,
            net.fc3.bias,
            in_fraction_bits=HIDDEN_BITS,
            out_fraction_bits=OUT_BITS,
            weight_bits=WEIGHT_BITS,
            in_bound=hidden_bound,
            out_limit=OUT_LIMIT,
            relu=False,
        )
    if model.latent is not None:
        layers["latent.conv1"] = quantise_conv(
            model.latent.conv1.weight,
            model.latent.conv1.bias,
            in_fraction_bits=0,
            out_fraction_bits=HIDDEN_BITS,
            weight_bits=Z_WEIGHT_BITS,
            in_bound=Z_LIMIT,
            out_limit=HIDDEN_LIMIT,
            relu=True,
            input_scale=cfg.q_step,
        )
        layers["latent.conv2"] = quantise_conv(
            model.latent.conv2.weight,
            model.latent.conv2.bias,
            in_fraction_bits=HIDDEN_BITS,
            out_fraction_bits=FEATURE_BITS,
            weight_bits=WEIGHT_BITS,
            in_bound=hidden_bound,
            out_limit=FEATURE_LIMIT / 16,
            relu=False,
        )
    return ExactContext(layers, cfg)  # fmt: skip


def first_sample_params(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile's first sample has no context: a wide distribution centred mid-range."""
    mu16 = (1 << (bits + 3)).view(-1, 1, 1)
    scale_index = (8 * (bits - 1) + 24).view(-1, 1, 1)
    return mu16, scale_index


class ContextPlaneCoder:
    def __init__(self, encoder: ContextLVPNet | None, exact: ExactContext, coder: PixelCoder) -> None:
        self._encoder, self._exact, self._coder = encoder, exact, coder
        self._config = exact.config

    def with_exact(self, exact: ExactContext) -> ContextPlaneCoder:
        """The same coder over other integer layers (a stream's single-image adaptation)."""
        return ContextPlaneCoder(self._encoder, exact, self._coder)

    def _latent_shape(self, h: int, w: int) -> tuple[int, int, int]:
        stride = self._config.latent_stride
        hp, wp = padded_shape(h, w, stride)
        return self._config.latent_channels, hp // stride, wp // stride

    def _schedule(self, h: int, w: int) -> list[tuple[int, str]]:
        out = []
        for s in level_schedule(h, w):
            for step in STEP_TYPES:
                rows, cols = step_targets(h, w, s, step)
                if rows.start < h and cols.start < w:
                    out.append((s, step))
        return out

    def encode(self, values: np.ndarray, bits: np.ndarray, options: ExecutionOptions) -> list[tuple[bytes, bytes]]:
        batch, h, w = values.shape
        latent_payloads = [b""] * batch
        latent = None
        if self._config.latent_channels:
            assert self._encoder is not None
            stride = self._config.latent_stride
            z = self._encoder.analyse(normalised_padded(values, bits, stride)).numpy()
            latent_payloads = [encode_latent(z[i].astype(np.int32)) for i in range(batch)]
            latent = self._exact.latent_map(z, options.compute, options.device)
        device = torch.device(options.device)
        full = torch.from_numpy(values).to(device)
        bits_t = torch.from_numpy(bits.astype(np.int64)).to(device)
        known = torch.zeros_like(full)
        known[:, 0, 0] = full[:, 0, 0]
        mu16, scale_index = first_sample_params(bits_t)
        step_values = [[full[i, :1, :1].cpu().numpy().ravel()] for i in range(batch)]
        step_params = [[StepParams(mu16[i].cpu().numpy().ravel(), scale_index[i].cpu().numpy().ravel())]
                       for i in range(batch)]  # fmt: skip
        with torch.no_grad():
            for s, step in self._schedule(h, w):
                rows, cols = step_targets(h, w, s, step)
                mu16, scale_index = self._exact.step(known, h, w, s, step, bits_t, latent, options.compute)
                target = full[:, rows, cols]
                known[:, rows, cols] = target
                for i in range(batch):
                    step_values[i].append(target[i].cpu().numpy().ravel())
                    step_params[i].append(
                        StepParams(mu16[i].cpu().numpy().ravel(), scale_index[i].cpu().numpy().ravel())
                    )
        kinds = [-1] + [STEP_TYPES.index(step) for _, step in self._schedule(h, w)]
        out = []
        for i in range(batch):
            offsets = self._choose_scale_offsets(step_values[i], step_params[i], kinds)
            params = _apply_offsets(step_params[i], kinds, offsets)
            header = bytes(o - SCALE_OFFSET_MIN for o in offsets)
            out.append((latent_payloads[i], header + self._coder.encode(step_values[i], params)))
        return out

    def _choose_scale_offsets(self, values: list[np.ndarray], params: list[StepParams], kinds: list[int]) -> list[int]:
        """Per-plane adaptation: one scale-index offset per step type, chosen by estimated bits."""
        offsets = []
        for t in range(len(STEP_TYPES)):
            members = [i for i, kind in enumerate(kinds) if kind == t]
            if not members:
                offsets.append(0)
                continue
            x = np.concatenate([values[i] for i in members])
            mu16 = np.concatenate([params[i].mu16 for i in members])
            scale_index = np.concatenate([params[i].scale_index for i in members])
            costs = {
                o: self._coder.estimate_bits(x, StepParams(mu16, scale_index + o))
                for o in range(SCALE_OFFSET_MIN, SCALE_OFFSET_MAX + 1)
            }
            offsets.append(min(costs, key=lambda o: (costs[o], abs(o))))
        return offsets

    def decode(
        self,
        payloads: list[tuple[bytes, bytes]],
        shape: tuple[int, int],
        bits: np.ndarray,
        options: ExecutionOptions,
    ) -> np.ndarray:
        h, w = shape
        batch = len(payloads)
        latent = None
        if self._config.latent_channels:
            z_shape = self._latent_shape(h, w)
            z = np.stack([decode_latent(z_payload, z_shape) for z_payload, _ in payloads]).astype(np.int64)
            latent = self._exact.latent_map(z, options.compute, options.device)
        device = torch.device(options.device)
        bits_t = torch.from_numpy(bits.astype(np.int64)).to(device)
        decoders, offsets = [], []
        for _, pixels in payloads:
            if len(pixels) < len(STEP_TYPES):
                raise CorruptStreamError("context plane payload truncated")
            offsets.append([b + SCALE_OFFSET_MIN for b in pixels[: len(STEP_TYPES)]])
            decoders.append(self._coder.decoder(pixels[len(STEP_TYPES) :]))
        if any(not SCALE_OFFSET_MIN <= o <= SCALE_OFFSET_MAX for plane in offsets for o in plane):
            raise CorruptStreamError("context plane scale offset out of range")
        known = torch.zeros((batch, h, w), dtype=torch.int64, device=device)
        mu16, scale_index = first_sample_params(bits_t)
        for i, decoder in enumerate(decoders):
            params = StepParams(mu16[i].cpu().numpy().ravel(), scale_index[i].cpu().numpy().ravel())
            known[i, 0, 0] = int(decoder.decode_step(params)[0])
        with torch.no_grad():
            for s, step in self._schedule(h, w):
                rows, cols = step_targets(h, w, s, step)
                mu16, scale_index = self._exact.step(known, h, w, s, step, bits_t, latent, options.compute)
                nr, nc = mu16.shape[1:]
                offset_slot = STEP_TYPES.index(step)
                for i, decoder in enumerate(decoders):
                    shifted = scale_index[i].cpu().numpy().ravel() + offsets[i][offset_slot]
                    params = StepParams(mu16[i].cpu().numpy().ravel(), shifted)
                    decoded = decoder.decode_step(params)
                    check_range(decoded, int(bits[i]))
                    known[i, rows, cols] = torch.from_numpy(decoded.reshape(nr, nc)).to(device)
        for decoder in decoders:
            decoder.finish()
        return known.cpu().numpy()
