"""Regenerate the golden streams (only when the format gains a version; old goldens stay forever).

.venv/bin/python -m tests.lvpnet.make_golden
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lvpnet import compress, decompress
from lvpnet.codec import CodecOptions
from tests.lvpnet.synthetic import smooth_image

GOLDEN = Path(__file__).with_name("golden")
FAITHFUL = "lvpnet-single-untrained-seed0"
CONTEXT = "lvpnet-ctx"


def cases() -> dict[str, tuple[np.ndarray, str, dict[str, object]]]:
    rng = np.random.default_rng(2024)
    dirty = smooth_image(rng, (64, 64), "uint16", 12) | (rng.integers(0, 16, (64, 64)).astype(np.uint16) << 12)
    return {
        "ct-int16-2frames": (
            smooth_image(rng, (2, 70, 90), "int16", 16),
            FAITHFUL,
            {"bits_stored": 16, "tile_size": 32},
        ),
        "rgb-uint8": (smooth_image(rng, (40, 50, 3), "uint8", 8), FAITHFUL, {"color": "RGB"}),
        "dirty-high-bits-uint16": (dirty, FAITHFUL, {"bits_stored": 12}),
        "ctx-uint16-12bit": (smooth_image(rng, (96, 80), "uint16", 12), CONTEXT, {"bits_stored": 12}),
        "ctx-int16-2frames": (smooth_image(rng, (2, 72, 64), "int16", 16), CONTEXT, {"bits_stored": 16}),
    }


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    manifest = {}
    for name, (image, model, kwargs) in cases().items():
        data = compress(image, model=model, options=CodecOptions(raw_fallback=False), **kwargs)  # type: ignore[arg-type]
        assert np.array_equal(decompress(data), image)
        (GOLDEN / f"{name}.lvp").write_bytes(data)
        manifest[name] = {
            "shape": list(image.shape),
            "dtype": str(image.dtype),
            "decoded_sha256": hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(),
        }
    (GOLDEN / "golden.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
