"""Golden streams: committed bytes whose decoded SHA-256 must never change, on any machine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lvpnet import decompress
from lvpnet.codec import CodecOptions, stream_stats
from lvpnet.spec.container import parse_header

GOLDEN = Path(__file__).with_name("golden")
MANIFEST = json.loads((GOLDEN / "golden.json").read_text())


@pytest.mark.parametrize("name", sorted(MANIFEST))
@pytest.mark.parametrize("options", [CodecOptions(), CodecOptions(batch=1, workers=2, compute="auto")])
def test_golden_stream_decodes_to_recorded_sha256(name: str, options: CodecOptions) -> None:
    data = (GOLDEN / f"{name}.lvp").read_bytes()
    assert stream_stats(data)["planes_model"] > 0
    out = decompress(data, options=options)
    expected = MANIFEST[name]
    assert list(out.shape) == expected["shape"] and str(out.dtype) == expected["dtype"]
    assert hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest() == expected["decoded_sha256"]


def test_golden_streams_name_shipped_weights() -> None:
    registry = json.loads((Path(__file__).parents[2] / "lvpnet/zoo/weights/registry.json").read_text())
    shipped = {entry["sha256"] for entries in registry["models"].values() for entry in entries}
    for name in MANIFEST:
        header = parse_header((GOLDEN / f"{name}.lvp").read_bytes())
        assert header.weights_sha256.hex() in shipped
