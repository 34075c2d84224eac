"""Figures shared by the notebooks and the course report. Each returns a matplotlib Figure."""

from __future__ import annotations

import matplotlib

if matplotlib.get_backend().lower() not in ("agg",) and "inline" not in matplotlib.get_backend():
    matplotlib.use("Agg")  # headless by default; notebooks keep their inline backend

import matplotlib.pyplot as plt
import numpy as np

from minildm.data.shapes import GRID


def loss_curves(card: dict, reference: dict | None = None, title: str = "training loss"):
    """A run's loss curve with the reference checkpoint's curve under it, log scale."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    if reference is not None and reference.get("loss_curve"):
        steps, losses = zip(*reference["loss_curve"])
        ax.plot(steps, losses, color="0.6", lw=2, label=f"reference ({reference.get('profile', '?')})")
    if card is not None and card.get("loss_curve"):
        steps, losses = zip(*card["loss_curve"])
        ax.plot(steps, losses, color="C0", lw=1.2, label="this run")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: list[str] | None = None, columns: int = 8,
               scale: float = 1.6, wrap: int = 28):
    """(N, H, W, 3) images in [0, 1] in a grid, each with an optional (wrapped) title."""
    import textwrap

    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * scale, rows * scale * (1.45 if titles else 1)))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            if titles:
                ax.set_title("\n".join(textwrap.wrap(titles[k], wrap)), fontsize=6)
    fig.tight_layout()
    return fig


def draw_grid_lines(ax, image_size: int) -> None:
    """The 3×3 cells of the shapes world, as thin lines over an image."""
    for k in range(1, GRID):
        ax.axhline(k * image_size / GRID - 0.5, color="white", lw=0.5, alpha=0.6)
        ax.axvline(k * image_size / GRID - 0.5, color="white", lw=0.5, alpha=0.6)
