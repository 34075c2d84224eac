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


def stat_curves(card: dict, panels: dict[str, list[str]], reference: dict | None = None):
    """Side-by-side panels of a card's per-step statistics (``card["stat_curves"]``): ``panels``
    maps a panel title to the statistics drawn in it (e.g. a GAN's two players). The reference
    run's curves, when given, are drawn under them in grey."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels.items()):
        for k, name in enumerate(names):
            if reference is not None and name in reference.get("stat_curves", {}):
                steps, values = zip(*reference["stat_curves"][name])
                ax.plot(steps, values, color="0.75", lw=2)
            if name in card.get("stat_curves", {}):
                steps, values = zip(*card["stat_curves"][name])
                ax.plot(steps, values, color=f"C{k}", lw=1.2, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def add_diagram():
    """ADD's three networks and two losses (Sauer et al. 2023, Fig. 2), drawn as boxes and arrows."""
    fig, ax = plt.subplots(figsize=(11, 3.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4)
    ax.axis("off")
    boxes = {
        "x0": (0.2, 1.7, "real latent x₀\n(noised at s ∈ {999, 749, 499, 249})", "0.9"),
        "student": (2.6, 1.7, "student x̂_θ\n(UNet, trained;\nstarts as the teacher)", "#cde"),
        "decoder": (5.0, 2.9, "decoder D\n(frozen)", "0.9"),
        "disc": (7.4, 2.9, "discriminator\nfrozen ViT F + trained heads\n(+ text, image condition)", "#ecd"),
        "renoise": (5.0, 0.5, "re-noise at t\nα_t·sg(x̂_θ) + σ_t·ε′", "0.9"),
        "teacher": (7.4, 0.5, "teacher x̂_ψ (frozen)\nguided x₀ prediction", "#dec"),
    }
    for x, y, text, color in boxes.values():
        ax.add_patch(plt.Rectangle((x, y), 2.1, 0.95, facecolor=color, edgecolor="0.3"))
        ax.text(x + 1.05, y + 0.47, text, ha="center", va="center", fontsize=7.5)

    def arrow(a, b, label=""):
        ax.annotate("", xy=b, xytext=a, arrowprops=dict(arrowstyle="->", color="0.2"))
        if label:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, label, fontsize=7, ha="center", color="0.2")

    arrow((2.3, 2.17), (2.6, 2.17))
    arrow((4.7, 2.4), (5.0, 3.3), "x̂_θ")
    arrow((7.1, 3.37), (7.4, 3.37), "image")
    arrow((4.7, 1.9), (5.0, 1.0))
    arrow((7.1, 0.97), (7.4, 0.97), "x̂_θ,t")
    ax.text(9.6, 3.37, "L_adv\n(hinge, R1)", fontsize=8, ha="left", va="center", color="C3")
    ax.text(9.6, 0.97, "λ·L_distill\nc(t)‖x̂_θ − x̂_ψ‖²", fontsize=8, ha="left", va="center", color="C2")
    fig.tight_layout()
    return fig


def claims_figure(figures: dict, ldm_card: dict, pixel_card: dict):
    """Notebook 07's four panels, one per claim family, from :func:`minildm.results.measure`'s
    figures and the latent and pixel reference cards (their training-time progress)."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))

    ax = axes[0]  # LDM: alignment against training seconds, latent and pixel
    for card, label in ((ldm_card, "latent (LDM)"), (pixel_card, "pixel")):
        seconds = [s for _, s, _ in card["progress"]]
        ax.plot(np.array(seconds) / 60, [m["alignment"] for _, _, m in card["progress"]], "o-", ms=3, label=label)
    ax.set(xlabel="training minutes (2-core CPU)", ylabel="judge alignment", title="LDM: equal wall clock")
    ax.legend()

    ax = axes[1]  # eDiff-I: prompt switching
    switch = figures["experts"]["prompt_switch"]
    fractions = sorted(switch, key=float)
    ax.plot([float(f) for f in fractions], [switch[f] for f in fractions], "o-", color="C2")
    ax.axvspan(0, 0.4, color="C2", alpha=0.08, label="paper: switch here changes the image")
    ax.axvspan(0.93, 1.0, color="0.5", alpha=0.15, label="paper: switch here changes nothing")
    ax.set(xlabel="share of the steps done on prompt A", ylabel="samples that follow prompt B", ylim=(-0.05, 1.05),
           title="eDiff-I: text matters early")
    ax.legend(fontsize=7)

    ax = axes[2]  # eDiff-I: paint-with-words placement against the weight
    paint = figures["paint"]
    for recipe, sweep in paint["sweeps"].items():
        weights = sorted(sweep, key=float)
        ax.plot([float(w) for w in weights], [sweep[w]["placement"] for w in weights], "o-", label=recipe)
    ax.axhline(paint["placement_unpainted"], color="0.5", ls="--", label="unpainted")
    ax.set(xscale="log", xlabel="paint weight w′", ylabel="placement", ylim=(-0.05, 1.05),
           title=f"paint-with-words (guidance {paint['guidance']:g})")
    ax.legend(fontsize=7)

    ax = axes[3]  # ADD: alignment of the student and the teacher by number of steps
    add = figures["add"]
    labels = ["student\n1", "student\n2", "student\n4", "teacher\nDDIM 1", "teacher\nDDIM 4",
              f"teacher\n{add['teacher_steps']} guided"]
    values = [add["alignment_1step"], add["alignment_2step"], add["alignment_4step"],
              add["teacher_ddim_1step_alignment"], add["teacher_ddim_4step_alignment"], add["teacher_alignment"]]
    ax.bar(range(len(values)), values, color=["C3"] * 3 + ["0.6"] * 3)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set(ylabel="judge alignment", title=f"ADD: {add['speedup_1step']:.0f}× faster at 1 step")
    fig.tight_layout()
    return fig
