"""Per-process codec state, loaded once: the default LVPNet model and the codec options."""

from __future__ import annotations

import os
import threading
from functools import cache
from typing import Any

_lock = threading.Lock()
_loaded = False


def torch_threads() -> int:
    return max(1, int(os.environ.get("ARCHIVE_WORKER_THREADS", "1")))


def load() -> None:
    """Import torch, set its thread count and load the default model's weights (SHA-256 checked)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        import torch

        from lvpnet.zoo import ZOO

        torch.set_num_threads(torch_threads())
        ZOO.get(None)
        _loaded = True


@cache
def default_model() -> str:
    from lvpnet.zoo import ZOO

    load()
    return ZOO.get(None).name


@cache
def codec_options() -> Any:
    """The GPU when this process has one (ARCHIVE_WORKER_DEVICE=cpu forces the CPU): decoding is
    exact integer arithmetic, so streams are identical either way (tests/lvpnet/test_gpu.py)."""
    import torch

    from lvpnet.codec import CodecOptions

    wanted = os.environ.get("ARCHIVE_WORKER_DEVICE", "auto")
    device = "cuda" if wanted in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    return CodecOptions(device=device)
