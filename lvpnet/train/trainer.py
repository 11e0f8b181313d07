"""Training loop: Adam + step decay (the paper's settings), resumable checkpoints, live bpp.

Loss = bits(x | z, context) per sample + `rate_weight` x a differentiable proxy of bits(z) per
sample (a factorised Laplace fit of z).  rate_weight = 0 is the paper's loss.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lvpnet.model.configs import build_model, config_from_dict
from lvpnet.model.context import ContextConfig, ContextLVPNet
from lvpnet.model.lvpnet import LVPNet, LVPNetConfig
from lvpnet.train.data import CropSampler, Frame, frames_digest
from lvpnet.train.losses import context_bits, faithful_bits

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    steps: int = 2000
    batch: int = 16
    crop: int = 128
    learning_rate: float = 1e-4
    decay_every: int = 1000  # step decay: x0.5 every `decay_every` steps
    decay_factor: float = 0.5
    rate_weight: float = 0.0  # 0 = the paper's loss (pixel bits only)
    seed: int = 0
    checkpoint_every: int = 200
    device: str = "cpu"
    threads: int = 2
    max_minutes: float | None = None  # compute budget: stop (and checkpoint) when it is spent
    # Context models: round as the exact integer decoder does (fixed-point step networks, mean to
    # 1/16, scale to 1/8 octave) with straight-through gradients
    quantisation_aware: bool = False
    init_from: str | None = None  # start from this zoo model's weights (same configuration)


def train(
    config: LVPNetConfig | ContextConfig,
    frames: list[Frame],
    settings: TrainSettings,
    checkpoint_dir: Path,
    *,
    progress: bool = True,
) -> LVPNet:
    """Train (or resume) a model; returns it on CPU in eval mode."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    model = build_model(config)
    if settings.init_from:
        model = _initial_weights(settings.init_from, config)
    if settings.quantisation_aware:
        if not isinstance(model, ContextLVPNet):
            raise ValueError("quantisation-aware training is built for the context models")
        model.set_quantisation_aware(True)
    model = model.to(device)
    batch_bits = context_bits if isinstance(model, ContextLVPNet) else faithful_bits
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, settings.decay_every, settings.decay_factor)
    sampler = CropSampler(frames, settings.crop, settings.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / "last.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["config"] != config.to_dict():
            raise ValueError(f"checkpoint {checkpoint} is for another configuration")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log.info("resumed", extra={"step": start, "checkpoint": str(checkpoint)})
    history: list[dict[str, float]] = []
    model.train()
    bar = tqdm(range(start, settings.steps), initial=start, total=settings.steps, disable=not progress)
    ema = None
    started = time.time()
    for step in bar:
        x_norm, x_int, mask, bits = (t.to(device) for t in sampler.batch(settings.batch))
        pixel_total, z_total = batch_bits(model, x_norm, x_int, mask, bits)  # type: ignore[arg-type]
        pixel_bits = pixel_total / mask.sum()
        z_bits = z_total / mask.sum()
        loss = pixel_bits + settings.rate_weight * z_bits
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimiser.step()
        scheduler.step()
        value = float(pixel_bits.detach()) + float(z_bits.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.set_postfix(bpp=f"{ema:.3f}", z=f"{float(z_bits):.3f}")
        history.append({"step": step + 1, "bpp": value, "pixel_bpp": float(pixel_bits), "z_bpp": float(z_bits)})
        out_of_time = settings.max_minutes is not None and time.time() - started > 60 * settings.max_minutes
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps or out_of_time:
            _save(checkpoint, model, optimiser, scheduler, sampler, step + 1, config)
        if out_of_time:
            break
    with (checkpoint_dir / "history.jsonl").open("a") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    meta = {
        "config": config.to_dict(),
        "settings": asdict(settings),
        "frames": len(frames),
        "frames_digest": frames_digest(frames),
        "seconds": round(time.time() - started, 1),
    }
    (checkpoint_dir / "train.json").write_text(json.dumps(meta, indent=2))
    return model.cpu().eval()


def _initial_weights(name: str, config: LVPNetConfig | ContextConfig) -> ContextLVPNet:
    """The float network of a zoo model (its integer weights dequantised exactly)."""
    from lvpnet.train.adapt import float_model
    from lvpnet.zoo import ZOO

    bundle = ZOO.get(name)
    if bundle.config.to_dict() | {"name": ""} != config.to_dict() | {"name": ""}:
        raise ValueError(f"zoo model {name!r} has another configuration than {config.name!r}")
    if not hasattr(bundle.exact, "layers") or not isinstance(bundle.config, ContextConfig):
        raise ValueError("starting from zoo weights is built for the context models")
    sampler = {k: torch.from_numpy(v) for k, v in bundle.encoder_state.items()} or None
    return float_model(bundle.exact, sampler)  # type: ignore[arg-type]


def _save(
    path: Path,
    model: LVPNet,
    optimiser,
    scheduler,
    sampler: CropSampler,
    step: int,  # type: ignore[no-untyped-def]
    config: LVPNetConfig,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler_rng": sampler.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "config": config.to_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint_model(path: Path) -> LVPNet | ContextLVPNet:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(config_from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model.eval()
