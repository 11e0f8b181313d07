from __future__ import annotations

import pytest

from lvpnet.model.configs import CONFIGS
from lvpnet.zoo import ZOO, ModelBundle, seeded_model

FAMILIES = {"faithful": "lvpnet-single", "context": "lvpnet-ctx"}
_BUNDLES: dict[str, ModelBundle] = {}


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def seeded(request: pytest.FixtureRequest) -> ModelBundle:
    """Small untrained models with deterministic weights, one per model family, registered by name."""
    family = request.param
    if family not in _BUNDLES:
        bundle = seeded_model(CONFIGS[FAMILIES[family]], seed=0, name=f"test-seeded-{family}")
        ZOO.register(bundle)
        _BUNDLES[family] = bundle
    return _BUNDLES[family]
