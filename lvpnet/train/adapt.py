"""Single-image mode, encoder side: fine-tune the step networks on the planes being coded.

Starts from the model's own integer weights (dequantised exactly), trains on random crops of the
image's tile planes with the loss bits(x | context) + bits(delta) / samples, where the second term
is a differentiable proxy of the delta's exp-Golomb code length: the delta is paid once per
stream, so a large image or a multi-frame series buys a bigger change.  The result is quantised in
the integer domain (`lvpnet.model.adaptation`); the codec keeps it only when the whole stream,
delta included, comes out smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lvpnet.model.adaptation import apply_delta, delta_between, pack_delta
from lvpnet.model.context import ContextLVPNet
from lvpnet.model.context_coding import (
    FEATURE_BITS,
    HIDDEN_BITS,
    WEIGHT_BITS,
    Z_WEIGHT_BITS,
    ExactContext,
    export_context,
)
from lvpnet.train.losses import context_bits


@dataclass(frozen=True)
class AdaptSettings:
    steps: int = 100
    batch: int = 8
    crop: int = 128
    learning_rate: float = 3e-4
    #: candidate quantisation steps of the delta, 2**-b in the float weight's units
    step_bits: tuple[int, ...] = (5, 6, 7)
    eval_crops: int = 16
    seed: int = 0
    # Fine-tune against the integer decoder's rounding: measured on 7 frames (JPEG2000.dcm and 6
    # held-out), -0.35 % with it against -0.40 % without; the rounding matters less than the data
    quantisation_aware: bool = False


# (fraction bits of the layer's input, fraction bits of its weights) as export_context quantises them
_STEP_LAYER_BITS = {
    "fc1": (FEATURE_BITS, WEIGHT_BITS),
    "fc2": (HIDDEN_BITS, WEIGHT_BITS),
    "fc3": (HIDDEN_BITS, WEIGHT_BITS),
}


def _layer_bits(name: str) -> tuple[int, int, float]:
    """(input fraction bits, weight fraction bits, input scale) of one exported layer."""
    if name.startswith("steps."):
        return (*_STEP_LAYER_BITS[name.rsplit(".", 1)[-1]], 1.0)
    if name == "latent.conv1":
        return 0, Z_WEIGHT_BITS, -1.0  # input scale: the model's q_step (filled in by the caller)
    if name == "latent.conv2":
        return HIDDEN_BITS, WEIGHT_BITS, 1.0
    raise KeyError(name)


def float_model(exact: ExactContext, sampler_state: dict[str, torch.Tensor] | None = None) -> ContextLVPNet:
    """The float network whose export gives back exactly these integer layers."""
    model = ContextLVPNet(exact.config)
    with torch.no_grad():
        for name, layer in exact.layers.items():
            in_bits, weight_bits, input_scale = _layer_bits(name)
            if input_scale < 0:
                input_scale = exact.config.q_step
            module = model.get_submodule(name)
            weight = layer.weight / 2.0**weight_bits / input_scale
            module.weight.copy_(torch.from_numpy(weight).view_as(module.weight))
            module.bias.copy_(torch.from_numpy(layer.bias / 2.0 ** (weight_bits + in_bits)))
        if sampler_state and model.latent is not None:
            model.latent.sampler.load_state_dict(sampler_state)
    return model


def _shifts(step_bits: int) -> dict[str, int]:
    # A float step of 2**-b is this shift of the integer grid; fc1 sees 1/16 units, so its bias
    # gets a step 16x finer (the same relative precision as its weights).
    return {
        "weight": WEIGHT_BITS - step_bits,
        "bias:fc1": WEIGHT_BITS + FEATURE_BITS - (step_bits + FEATURE_BITS),
        "bias:fc2": WEIGHT_BITS + HIDDEN_BITS - step_bits,
        "bias:fc3": WEIGHT_BITS + HIDDEN_BITS - step_bits,
    }


class _PlaneCrops:
    """Random crops of the tile planes as the codec codes them (tile minimum removed, tile bits)."""

    def __init__(self, planes: list[tuple[np.ndarray, int]], crop: int, seed: int, multiple: int = 1) -> None:
        self.planes = planes
        # the latent's sampler takes sides that are multiples of its stride (padding is masked out)
        self.crop = -(-min(crop, max(max(v.shape) for v, _ in planes)) // multiple) * multiple
        areas = np.array([v.size for v, _ in planes], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> tuple[torch.Tensor, ...]:
        c = self.crop
        x_int = np.zeros((size, 1, c, c), dtype=np.int64)
        mask = np.zeros((size, 1, c, c), dtype=bool)
        bits = np.zeros(size, dtype=np.int64)
        for i, index in enumerate(self.rng.choice(len(self.planes), size=size, p=self.weights)):
            values, plane_bits = self.planes[index]
            h, w = values.shape
            top = int(self.rng.integers(0, max(1, h - c + 1)))
            left = int(self.rng.integers(0, max(1, w - c + 1)))
            crop = values[top : top + c, left : left + c]
            ch, cw = crop.shape
            x_int[i, 0] = np.pad(crop, ((0, c - ch), (0, c - cw)), mode="edge")
            mask[i, 0, :ch, :cw] = True
            bits[i] = plane_bits
        x_norm = x_int.astype(np.float32) / (2.0 ** bits[:, None, None, None]).astype(np.float32)
        return torch.from_numpy(x_norm), torch.from_numpy(x_int), torch.from_numpy(mask), torch.from_numpy(bits)


def _delta_bits_proxy(model: ContextLVPNet, base: dict[str, torch.Tensor], step_bits: int) -> torch.Tensor:
    """Differentiable stand-in for the exp-Golomb bits of the quantised delta (about 2 log2 |q|)."""
    total = torch.zeros(())
    for name, param in model.named_parameters():
        if not name.startswith("steps."):
            continue
        step = 2.0**-step_bits / (16 if name.endswith("fc1.bias") else 1)
        total = total + (2 * torch.log2(1 + (param - base[name]).abs() / step)).sum()
    return total


def fine_tune(
    exact: ExactContext,
    planes: list[tuple[np.ndarray, int]],
    settings: AdaptSettings,
    sampler_state: dict[str, torch.Tensor] | None = None,
    *,
    require_gain: bool = True,
) -> bytes:
    """An adaptation payload for these planes, or b"" when no candidate beats the base model on
    the evaluation crops (estimated bits, delta included; `require_gain=False`: the best candidate
    whatever it costs, b"" only when fine-tuning changed nothing)."""
    if not planes or settings.steps <= 0:
        return b""
    torch.manual_seed(settings.seed)
    model = float_model(exact, sampler_state)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for n, p in model.named_parameters() if n.startswith("steps.")]
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("steps."))
    total_samples = sum(v.size for v, _ in planes)
    stride = exact.config.latent_stride if exact.config.latent_channels else 1
    crops = _PlaneCrops(planes, settings.crop, settings.seed, stride)
    evaluation = crops.batch(settings.eval_crops)  # fixed crops, drawn first, to compare candidates
    eval_scale = total_samples / float(evaluation[2].sum())
    optimiser = torch.optim.Adam(trainable, lr=settings.learning_rate)
    middle = settings.step_bits[len(settings.step_bits) // 2]
    model.set_quantisation_aware(settings.quantisation_aware and model.latent is None)
    model.train()
    for _ in range(settings.steps):
        x_norm, x_int, mask, bits = crops.batch(settings.batch)
        pixel_total, _ = context_bits(model, x_norm, x_int, mask, bits)
        loss = pixel_total / mask.sum() + _delta_bits_proxy(model, base, middle) / total_samples
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 10.0)
        optimiser.step()
    model.eval()
    model.set_quantisation_aware(False)
    tuned_layers = export_context(model).layers
    best_payload = b""
    best_bits = _estimate(exact, evaluation, sampler_state) * eval_scale if require_gain else math.inf
    for step_bits in settings.step_bits:
        deltas = delta_between(exact, tuned_layers, _shifts(step_bits))
        payload = pack_delta(exact, deltas)
        if not payload:
            continue
        estimate = _estimate(apply_delta(exact, payload), evaluation, sampler_state) * eval_scale + 8 * len(payload)
        if estimate < best_bits:
            best_payload, best_bits = payload, estimate
    return best_payload


def _estimate(
    exact: ExactContext, batch: tuple[torch.Tensor, ...], sampler_state: dict[str, torch.Tensor] | None
) -> float:
    """Estimated code length (bits) of the evaluation crops under these integer layers."""
    model = float_model(exact, sampler_state)
    # these are integer weights, so the decoder's rounding is known (the latent branch has no
    # fixed-point twin in the float network: plain float there)
    model.set_quantisation_aware(model.latent is None)
    with torch.no_grad():
        pixel_total, _ = context_bits(model, *batch)
    return float(pixel_total)


__all__ = ["AdaptSettings", "fine_tune", "float_model"]
