"""Training curves of the shipped models (bench/training/*-history.jsonl, every 10th step).

    .venv/bin/python bench/plot_training.py   ->  bench/training/curves.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

HERE = Path(__file__).parent / "training"


def main() -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for history in sorted(HERE.glob("*-history.jsonl")):
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        steps = np.array([r["step"] for r in rows])
        bpp = np.array([r["bpp"] for r in rows])
        smooth = np.convolve(bpp, np.ones(10) / 10, mode="valid")
        ax.plot(steps[: len(smooth)], smooth, label=history.name.removesuffix("-history.jsonl"))
    ax.set_xlabel("step")
    ax.set_ylabel("training bits per sample (float model, crops)")
    ax.set_title("Training on ../shared/corpus/dev (held-out series excluded)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)


if __name__ == "__main__":
    main()
