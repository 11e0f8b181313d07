"""Weights zoo: named models, each a file with a recorded SHA-256, loaded only if the hash matches.

A bundle holds everything one model needs, in integers where the decoder reads it:
the integer decoder layers, the integer CDF tables (built by the explicit export step), and
the float encoder (sampler) weights, which only the encoder uses (z is transmitted).
Old weights are never removed from the registry: every stream ever written names its model
and weights hash, and must stay decodable.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lvpnet.entropy.pixelcoder import PixelCoder
from lvpnet.entropy.tables import TABLES_VERSION, LaplaceTables, build_laplace_tables
from lvpnet.errors import CorruptStreamError, UnsupportedStreamError, WeightsError
from lvpnet.model.adaptation import apply_delta
from lvpnet.model.configs import build_model, config_from_dict
from lvpnet.model.context import ContextConfig, ContextLVPNet
from lvpnet.model.context_coding import ContextPlaneCoder, ExactContext, export_context
from lvpnet.model.exact import ExactLVPNet
from lvpnet.model.export import export_exact
from lvpnet.model.intnet import IntConv
from lvpnet.model.lvpnet import LVPNet, LVPNetConfig
from lvpnet.model.plane_coding import FaithfulPlaneCoder, PlaneCoder

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGISTRY_FILE = WEIGHTS_DIR / "registry.json"
BUNDLE_FORMAT = 1


@dataclass
class ModelBundle:
    name: str
    config: LVPNetConfig | ContextConfig
    exact: ExactLVPNet | ExactContext
    tables: LaplaceTables
    encoder_state: dict[str, np.ndarray]
    sha256: str = ""
    serialized: bytes = field(default=b"", repr=False)  # the exact bytes the SHA-256 covers
    _encoder: LVPNet | ContextLVPNet | None = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _plane_coder: PlaneCoder | None = field(default=None, repr=False)

    def encoder(self) -> LVPNet | ContextLVPNet:
        """The float network with the sampler weights loaded (encoder side only: z is transmitted)."""
        with self._lock:
            if self._encoder is None:
                net = build_model(self.config)
                state = {k: torch.from_numpy(v) for k, v in self.encoder_state.items()}
                if isinstance(net, LVPNet):
                    sampler = net.sampler
                else:  # a context model without a latent (lvpnet-ctx-nolatent) has no sampler at all
                    sampler = net.latent.sampler if net.latent is not None else None
                if state and sampler is not None:
                    sampler.load_state_dict(state)
                elif state:
                    raise ValueError(f"{self.name}: sampler weights for a configuration without a latent")
                net.eval()
                self._encoder = net
            return self._encoder

    def plane_coder(self) -> PlaneCoder:
        with self._lock:
            if self._plane_coder is None:
                coder = PixelCoder(self.tables)
                if isinstance(self.exact, ExactContext):
                    self._plane_coder = ContextPlaneCoder(self.encoder(), self.exact, coder)  # type: ignore[arg-type]
                else:
                    self._plane_coder = FaithfulPlaneCoder(
                        self.encoder(),  # type: ignore[arg-type]
                        self.exact,
                        coder,
                        self.config.latent_channels,
                    )
            return self._plane_coder

    def adapted(self, payload: bytes) -> ModelBundle:
        """This model with a stream's single-image weight delta applied (same name and SHA-256: the
        stream names the base weights).  CorruptStreamError when the delta is invalid."""
        if not isinstance(self.exact, ExactContext):
            raise CorruptStreamError(f"model {self.name!r} takes no adaptation (it has no step networks)")
        exact = apply_delta(self.exact, payload)
        base = self.plane_coder()
        assert isinstance(base, ContextPlaneCoder)
        return ModelBundle(
            self.name,
            self.config,
            exact,
            self.tables,
            self.encoder_state,
            self.sha256,
            _encoder=self._encoder,
            _plane_coder=base.with_exact(exact),
        )

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(
                json.dumps(
                    {
                        "format": BUNDLE_FORMAT,
                        "name": self.name,
                        "config": self.config.to_dict(),
                        "tables_version": TABLES_VERSION,
                        "layers": sorted(self.exact.layers),
                    },
                    sort_keys=True,
                ).encode(),
                dtype=np.uint8,
            ),
            "tables": self.tables.frequencies,
        }
        for name, layer in self.exact.layers.items():
            arrays.update(layer.arrays(f"int.{name}"))
        arrays.update({f"enc.{k}": v for k, v in self.encoder_state.items()})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, expected_sha256: str | None = None) -> ModelBundle:
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise WeightsError(f"weights SHA-256 {digest} does not match the recorded {expected_sha256}")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(arrays["meta"].tobytes())
        except (ValueError, KeyError, OSError) as exc:
            raise WeightsError(f"unreadable weights file: {exc}") from exc
        if meta.get("format") != BUNDLE_FORMAT:
            raise WeightsError(f"unknown weights format {meta.get('format')}")
        config = config_from_dict(meta["config"])
        layers = {name: IntConv.from_arrays(arrays, f"int.{name}") for name in meta["layers"]}
        exact = exact_from_layers(layers, config)
        encoder_state = {k[4:]: v for k, v in arrays.items() if k.startswith("enc.")}
        return cls(meta["name"], config, exact, LaplaceTables(arrays["tables"]), encoder_state, digest, data)

    def save(self, directory: Path) -> Path:
        """Write the weights as `<name>-<sha8>.npz` (the bytes the SHA-256 was taken of)."""
        path = directory / f"{self.name}-{self.sha256[:8]}.npz"
        path.write_bytes(self.serialized)
        return path


def exact_from_layers(layers: dict[str, IntConv], config: LVPNetConfig | ContextConfig) -> ExactLVPNet | ExactContext:
    if isinstance(config, ContextConfig):
        return ExactContext(layers, config)
    return ExactLVPNet(layers, config.qcm_blocks if config.use_qcm else 0, config.use_qcm)


def bundle_from_model(model: LVPNet | ContextLVPNet, name: str) -> ModelBundle:
    """The export step: integer decoder layers + CDF tables + encoder weights, hashed."""
    if isinstance(model, ContextLVPNet):
        sampler = model.latent.sampler if model.latent is not None else None
        exact: ExactLVPNet | ExactContext = export_context(model)
    else:
        sampler, exact = model.sampler, export_exact(model)
    state = sampler.state_dict().items() if sampler is not None else []
    encoder_state = {k: v.detach().cpu().numpy().copy() for k, v in state}
    bundle = ModelBundle(name, model.config, exact, build_laplace_tables(), encoder_state)
    # Zip archives carry timestamps: serialise once and hash exactly those bytes.
    bundle.serialized = bundle.to_bytes()
    bundle.sha256 = hashlib.sha256(bundle.serialized).hexdigest()
    return bundle


def seeded_model(config: LVPNetConfig | ContextConfig, seed: int = 0, name: str | None = None) -> ModelBundle:
    """An untrained model with deterministic weights (tests, and the floor any model must beat)."""
    torch.manual_seed(seed)
    return bundle_from_model(build_model(config), name or f"{config.name}-untrained-seed{seed}")


class Zoo:
    """Registry of named models: the files shipped in the package plus any registered at run time."""

    def __init__(self, registry_file: Path = REGISTRY_FILE) -> None:
        self._registry_file = registry_file
        self._loaded: dict[str, ModelBundle] = {}  # by sha256
        self._extra: dict[str, ModelBundle] = {}  # by name, registered in memory
        self._lock = threading.Lock()
        self._fallback: Callable[[str, str], bytes | None] | None = None

    def set_fallback(self, fetch: Callable[[str, str], bytes | None] | None) -> None:
        """Where to find weights a stream names that this installation does not ship (e.g. the
        archive's object store after a disaster recovery onto a different release): `fetch(name,
        sha256)` returns the bundle's bytes or None.  The SHA-256 is checked like a shipped file's."""
        with self._lock:
            self._fallback = fetch

    def _registry(self) -> dict[str, object]:
        if not self._registry_file.exists():
            return {"default": None, "models": {}}
        return json.loads(self._registry_file.read_text())

    def names(self) -> list[str]:
        models = self._registry()["models"]
        assert isinstance(models, dict)
        return sorted({*models, *self._extra})

    def default_name(self) -> str:
        default = self._registry().get("default")
        if not isinstance(default, str):
            raise WeightsError("no default model is registered")
        return default

    def register(self, bundle: ModelBundle) -> None:
        with self._lock:
            self._extra[bundle.name] = bundle
            self._loaded[bundle.sha256] = bundle

    def unregister(self, name: str) -> None:
        """Forget every loaded version of `name` (shipped versions load again from their files)."""
        with self._lock:
            self._extra.pop(name, None)
            for sha256 in [s for s, b in self._loaded.items() if b.name == name]:
                del self._loaded[sha256]

    def get(self, name: str | None = None, sha256: str | None = None) -> ModelBundle:
        """Load a model by name (default when None); with `sha256`, the exact weights a stream needs."""
        name = name or self.default_name()
        try:
            return self._get(name, sha256)
        except (UnsupportedStreamError, WeightsError):
            with self._lock:
                fetch = self._fallback
            if sha256 is None or fetch is None:
                raise
            data = fetch(name, sha256)
            if data is None:
                raise
        bundle = ModelBundle.from_bytes(data, sha256)
        if bundle.name != name:
            raise WeightsError(f"weights {sha256[:12]} found for model {name!r} belong to {bundle.name!r}")
        with self._lock:
            return self._loaded.setdefault(bundle.sha256, bundle)

    def _get(self, name: str, sha256: str | None) -> ModelBundle:
        with self._lock:
            if sha256 is not None and sha256 in self._loaded:
                return self._loaded[sha256]
            if name in self._extra and sha256 in (None, self._extra[name].sha256):
                return self._extra[name]
            models = self._registry()["models"]
            assert isinstance(models, dict)
            entries = models.get(name)
            if entries is None and name not in self._extra:
                known = self.names()
                raise UnsupportedStreamError(f"model {name!r} is not in the weights zoo (known: {known})")
            # An entry lists every version of the named weights ever shipped (newest first).
            for entry in entries or []:
                if sha256 is None or entry["sha256"] == sha256:
                    cached = self._loaded.get(entry["sha256"])
                    if cached is not None:
                        return cached
                    path = self._registry_file.parent / entry["file"]
                    if not path.exists():
                        raise WeightsError(f"weights file {path.name} for model {name!r} is missing")
                    bundle = ModelBundle.from_bytes(path.read_bytes(), entry["sha256"])
                    self._loaded[bundle.sha256] = bundle
                    return bundle
            raise UnsupportedStreamError(f"model {name!r} has no weights with SHA-256 {sha256}")


def register_in_file(
    bundle: ModelBundle, path: Path, *, make_default: bool = False, registry_file: Path = REGISTRY_FILE
) -> None:
    """Add shipped weights to the registry; earlier versions of the name are kept (old streams)."""
    registry = json.loads(registry_file.read_text()) if registry_file.exists() else {"default": None, "models": {}}
    entries = registry["models"].setdefault(bundle.name, [])
    if all(e["sha256"] != bundle.sha256 for e in entries):
        entries.insert(0, {"file": path.name, "sha256": bundle.sha256, "config": bundle.config.to_dict()})
    if make_default or registry.get("default") is None:
        registry["default"] = bundle.name
    registry_file.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")


ZOO = Zoo()
