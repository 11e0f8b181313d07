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
    from lvpnet.codec import CodecOptions

    return CodecOptions()
