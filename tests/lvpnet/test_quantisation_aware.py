"""Quantisation-aware training: the float forward pass rounds exactly as the integer decoder does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvpnet.cli import main
from lvpnet.model.context import STEP_TYPES, ContextLVPNet
from lvpnet.model.context_coding import ExactContext, export_context
from lvpnet.train.adapt import float_model
from lvpnet.train.data import CropSampler, Frame
from lvpnet.train.losses import context_bits
from lvpnet.zoo import ZOO
from tests.lvpnet.synthetic import smooth_image


def _default() -> tuple[ContextLVPNet, ExactContext]:
    exact = ZOO.get().exact
    assert isinstance(exact, ExactContext)
    return float_model(exact), exact


def test_fixed_point_step_networks_match_the_integer_twin() -> None:
    model, exact = _default()
    model = model.double()
    model.set_quantisation_aware(True)
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.integers(-255, 256, (2, model.config.inputs, 9, 11)).astype(np.float64))
    for step in STEP_TYPES:
        mean_int, scale_int = exact._net(step, features, "float64")
        with torch.no_grad():
            out = model.steps[step](features / 16)
        torch.testing.assert_close(out[:, 0] * 256, mean_int.double(), rtol=0, atol=0)
        torch.testing.assert_close(out[:, 1] * 256, scale_int.double(), rtol=0, atol=0)
    # without the flag the float network does not round (what plain training optimises)
    model.set_quantisation_aware(False)
    with torch.no_grad():
        plain = model.steps["D"](features / 16)
    assert not torch.equal(plain[:, 0] * 256, exact._net("D", features, "float64")[0].double())


def test_quantisation_aware_loss_has_gradients_and_tracks_the_plain_loss() -> None:
    model, _ = _default()
    rng = np.random.default_rng(1)
    frames = [Frame(f"f{i}", "s", "CT", smooth_image(rng, (96, 96), "uint16", 12).astype(np.int32)) for i in range(2)]
    batch = CropSampler(frames, 64, seed=0).batch(4)
    plain, _ = context_bits(model, *batch)
    model.set_quantisation_aware(True)
    rounded, _ = context_bits(model, *batch)
    rounded.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("steps.")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)
    # rounding to the decoder's grid costs a little, never a lot (measured gap: about 0.2 %)
    assert abs(float(rounded.detach()) / float(plain.detach()) - 1) < 0.02
    # export of the QAT model gives the same integers the fixed-point forward used
    exported = export_context(model)
    for name, layer in exported.layers.items():
        np.testing.assert_array_equal(layer.weight, ZOO.get().exact.layers[name].weight)


def test_train_from_zoo_weights_quantisation_aware(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        Image.fromarray(smooth_image(rng, (64, 64), "uint16", 10)).save(data / f"t{i}.png")
    argv = ["-q", "train", "--data", str(data), "--config", "lvpnet-ctx-nolatent", "--init", "lvpnet-ctx-nolatent",
            "--qat", "--steps", "2", "--batch", "2", "--crop", "32", "--threads", "1", "--lr", "1e-9",
            "--name", "qat-test", "--checkpoints", str(tmp_path / "ck")]  # fmt: skip
    assert main(argv) == 0
    (weights,) = (tmp_path / "ck" / "qat-test").glob("*.npz")
    from lvpnet.zoo import ModelBundle

    bundle = ModelBundle.from_bytes(weights.read_bytes())
    # two steps at a negligible learning rate from the zoo's weights: the same integers come back
    for name, layer in ZOO.get().exact.layers.items():
        assert np.abs(bundle.exact.layers[name].weight - layer.weight).max() <= 1
