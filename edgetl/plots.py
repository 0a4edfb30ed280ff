"""Plots people would rather look at than read: training curves and confusion matrices (PNG, atomic)."""
from __future__ import annotations

import functools
import os

import numpy as np


@functools.cache
def _figure():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), chosen once per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Save a matplotlib figure atomically and close it."""
    from edgetl.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _figure().close(fig)


def plot_training_curves(history: dict, path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch for both stages, with the stage boundary marked."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0
    for stage, color in (("stage1", "tab:blue"), ("stage2", "tab:orange")):
        h = history.get(stage) or {}
        n = len(h.get("loss", []))
        if not n:
            continue
        epochs = np.arange(offset + 1, offset + n + 1)
        accuracies = [k for k in h if k.endswith("accuracy") and not k.startswith("val_")]  # one per head
        for ax, keys in zip(axes, (["loss"], accuracies)):
            for key, alpha in zip(keys, np.linspace(1.0, 0.4, max(len(keys), 1))):
                name = f"{stage} {key.removesuffix('_accuracy')} " if len(keys) > 1 else f"{stage} "
                if key in h:
                    ax.plot(epochs, h[key], color=color, alpha=alpha, label=f"{name}train")
                if f"val_{key}" in h:
                    ax.plot(epochs, h[f"val_{key}"], color=color, alpha=alpha, linestyle="--", label=f"{name}val")
        if offset:
            for ax in axes:
                ax.axvline(offset + 0.5, color="grey", linewidth=0.8)
        offset += n
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Training curves (dashed: validation)")
    save_figure(fig, path)


def plot_confusion_matrix(matrix, class_names: list[str], path: str | os.PathLike, title: str = "Confusion matrix"):
    """Row-normalised confusion matrix with counts in the cells."""
    plt = _figure()
    cm = np.asarray(matrix, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    size = min(1.0 + 0.55 * k, 14)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title)
    save_figure(fig, path)



def plot_labeled_scatter(points, path: str | os.PathLike, *, xlabel: str, ylabel: str, title: str,
                         front=(), highlight: str | None = None, logx: bool = False) -> None:
    """Scatter of named points (label, x, y, group), every point labeled, colored by group.

    `front` (labels, in x order) is drawn as a dashed line through ringed points, e.g. a Pareto front;
    `highlight` gets a star. Labels of nearby points are stacked so that they stay readable.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _figure()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = sorted({p[3] for p in points})
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    for group in groups:
        ax.scatter([p[1] for p in points if p[3] == group], [p[2] for p in points if p[3] == group], s=40,
                   color=colors[group], label=group, zorder=3)
    by_label = {p[0]: p for p in points}
    line = [by_label[name] for name in front if name in by_label]
    if line:
        ax.plot([p[1] for p in line], [p[2] for p in line], linestyle="--", color="grey", marker="o", markersize=12,
                markerfacecolor="none", zorder=2, label="Pareto front")
    if highlight in by_label:
        _, x, y, _ = by_label[highlight]
        ax.scatter([x], [y], s=260, marker="*", facecolors="none", edgecolors="black", zorder=4,
                   label=f"recommended: {highlight}")
    if logx:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15, y=0.12)
    _place_labels(ax, points)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)


def _place_labels(ax, points, height: float = 10.0, char_width: float = 5.0) -> None:
    """Annotate each point, moving a label down while its box (in points) would overlap one already placed."""
    ax.autoscale_view()
    to_points = 72.0 / ax.figure.dpi
    placed = []
    for label, x, y, _ in sorted(points, key=lambda p: (-p[2], p[1])):
        px, py = ax.transData.transform((x, y)) * to_points
        dy, width = 4.0, char_width * len(label)
        while any(abs(px - qx) < max(width, qw) and abs(py + dy - qy) < height for qx, qy, qw in placed):
            dy -= height
        placed.append((px, py + dy, width))
        ax.annotate(label, (x, y), xytext=(5, dy), textcoords="offset points", fontsize=8)
