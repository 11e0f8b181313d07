from __future__ import annotations

import pytest

from lvpnet.model.lvpnet import CONFIGS
from lvpnet.zoo import ZOO, ModelBundle, seeded_model


@pytest.fixture(scope="session")
def seeded() -> ModelBundle:
    """A small untrained model with deterministic weights, registered in the zoo by name."""
    bundle = seeded_model(CONFIGS["lvpnet-single"], seed=0, name="test-seeded")
    ZOO.register(bundle)
    return bundle
