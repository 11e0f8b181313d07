"""Named configurations of both model families, and building a network from one."""

from __future__ import annotations

from lvpnet.model.context import ContextConfig, ContextLVPNet
from lvpnet.model.lvpnet import CONFIGS as FAITHFUL_CONFIGS
from lvpnet.model.lvpnet import LVPNet, LVPNetConfig

ModelConfig = LVPNetConfig | ContextConfig

CONFIGS: dict[str, ModelConfig] = {
    **FAITHFUL_CONFIGS,
    "lvpnet-ctx": ContextConfig(),
    "lvpnet-ctx-nolatent": ContextConfig(name="lvpnet-ctx-nolatent", latent_channels=0),
}


def build_model(config: ModelConfig) -> LVPNet | ContextLVPNet:
    return ContextLVPNet(config) if isinstance(config, ContextConfig) else LVPNet(config)


def config_from_dict(values: dict[str, object]) -> ModelConfig:
    if values.get("kind") == "context":
        return ContextConfig(**values)  # type: ignore[arg-type]
    return LVPNetConfig(**values)  # type: ignore[arg-type]
