"""CUDA paths: a stream encoded on the GPU decodes on the CPU bit for bit, and vice versa.

Runs on a machine with a CUDA device (`pytest -m gpu`); CI machines have none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvpnet import compress, decompress
from lvpnet.codec import CodecOptions
from lvpnet.zoo import ModelBundle
from tests.lvpnet.synthetic import smooth_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = CodecOptions(device="cuda", batch=16, raw_fallback=False)
CPU = CodecOptions(raw_fallback=False)


@pytest.mark.parametrize("shape,dtype", [((3, 300, 260), "uint16"), ((2, 200, 180), "int16")])
def test_gpu_encoded_streams_decode_on_cpu(seeded: ModelBundle, shape: tuple[int, ...], dtype: str) -> None:
    image = smooth_image(np.random.default_rng(11), shape, dtype, 12)
    on_gpu = compress(image, bits_stored=12, model=seeded.name, tile_size=128, options=GPU)
    on_cpu = compress(image, bits_stored=12, model=seeded.name, tile_size=128, options=CPU)
    assert np.array_equal(decompress(on_gpu, options=CPU), image)
    assert np.array_equal(decompress(on_cpu, options=GPU), image)
