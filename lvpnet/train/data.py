"""Training data: de-duplicated frames from DICOM/PNG/TIFF folders, split by series, as random crops.

Crops are normalised exactly as the codec normalises a tile: value - crop minimum, divided by
2**bit_length(range), so the network sees at training time what it sees when coding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HELDOUT_FILE = Path(__file__).with_name("heldout_series.txt")


@dataclass
class Frame:
    name: str
    series: str
    modality: str
    plane: np.ndarray  # int32 (h, w): one sample plane


def load_heldout(path: Path = HELDOUT_FILE) -> set[str]:
    """Series held out from training (committed), one key per line; '#' starts a comment."""
    if not path.exists():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def series_key(name: str, info: dict[str, object]) -> str:
    """The split unit: the series UID when the file has one, else the file."""
    series = info.get("series_instance_uid")
    return str(series) if series else name.split("#", 1)[0]


def load_frames(roots: list[Path], *, heldout: set[str], split: str) -> list[Frame]:
    """All de-duplicated sample planes of the requested split ("train" or "heldout")."""
    from lvpnet.imageio import iter_corpus_frames  # pydicom & co. only when reading folders

    frames = []
    for root in roots:
        for name, array, info in iter_corpus_frames(root):
            key = series_key(name, info)
            if (key in heldout) != (split == "heldout"):
                continue
            planes = array[..., None] if array.ndim == 2 else array
            for s in range(planes.shape[-1]):
                plane = planes[..., s].astype(np.int32)
                if plane.max() > plane.min():
                    frames.append(Frame(f"{name}:{s}", key, str(info.get("modality", "")), plane))
    return frames


class CropSampler:
    """Deterministic random crops (seeded), edge-padded when a frame is smaller than the crop."""

    def __init__(self, frames: list[Frame], crop: int, seed: int) -> None:
        if not frames:
            raise ValueError("no training frames")
        self.frames, self.crop = frames, crop
        self.rng = np.random.default_rng(seed)
        # Weight frames by area so big radiographs are not under-sampled next to 64x64 test images.
        areas = np.array([f.plane.size for f in frames], dtype=np.float64)
        self.weights = np.sqrt(areas) / np.sqrt(areas).sum()

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_norm, x_int, mask, bits): (B,1,c,c) float, (B,1,c,c) int, (B,1,c,c) bool, (B,)."""
        c = self.crop
        x_int = np.zeros((size, 1, c, c), dtype=np.int64)
        mask = np.zeros((size, 1, c, c), dtype=bool)
        bits = np.zeros(size, dtype=np.int64)
        for i, index in enumerate(self.rng.choice(len(self.frames), size=size, p=self.weights)):
            plane = self.frames[index].plane
            h, w = plane.shape
            top = int(self.rng.integers(0, max(1, h - c + 1)))
            left = int(self.rng.integers(0, max(1, w - c + 1)))
            crop = plane[top : top + c, left : left + c]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            ch, cw = crop.shape
            values = crop.astype(np.int64) - int(crop.min())
            bits[i] = max(1, int(values.max()).bit_length())
            x_int[i, 0] = np.pad(values, ((0, c - ch), (0, c - cw)), mode="edge")
            mask[i, 0, :ch, :cw] = True
        x_norm = torch.from_numpy(x_int.astype(np.float32) / (2.0 ** bits[:, None, None, None]).astype(np.float32))
        return x_norm, torch.from_numpy(x_int), torch.from_numpy(mask), torch.from_numpy(bits)


def frames_digest(frames: list[Frame]) -> str:
    """Identifies the training set in checkpoints and model cards."""
    h = hashlib.sha256()
    for f in sorted(frames, key=lambda f: f.name):
        h.update(f.name.encode())
    return h.hexdigest()[:16]
