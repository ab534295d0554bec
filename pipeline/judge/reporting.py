"""Plots and plot data: CSV files that DVC renders, and matplotlib figures that MLflow stores with the run."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.classes import CLASSES, LABELS  # noqa: E402
from pipeline.io import atomic_path  # noqa: E402


def write_csv(rows: list[dict], target: str | Path, columns: Sequence[str] | None = None) -> None:
    """Rows of dicts -> CSV, written atomically; the columns are ``columns`` or else the first row's keys."""
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns or (rows[0] if rows else [])))
        writer.writeheader()
        writer.writerows(rows)


def confusion_rows(y: np.ndarray, p: np.ndarray, threshold: float) -> list[dict]:
    """One row per image, the shape DVC's confusion template reads."""
    label = np.array(LABELS)
    return [{"actual": a, "predicted": b} for a, b in zip(label[y.astype(int)], label[(p >= threshold).astype(int)])]


def save_figure(fig, target: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, atomically."""
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi)


def write_history_csv(history: dict[str, list[float]], target: str | Path) -> None:
    epochs = len(next(iter(history.values()), []))
    write_csv([{"epoch": i + 1, **{k: float(v[i]) for k, v in history.items()}} for i in range(epochs)], target)


def training_curves(history: dict[str, list[float]]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for key in ("loss", "val_loss"):
        if key in history:
            axes[0].plot(epochs, history[key], label=key)
    for key in ("accuracy", "val_accuracy", "val_balanced_accuracy", "val_f1"):
        if key in history:
            axes[1].plot(epochs, history[key], label=key)
    axes[0].set(xlabel="epoch", ylabel="binary cross-entropy", title="loss")
    axes[1].set(xlabel="epoch", ylim=(0, 1), title="accuracy and F1 (FAKE positive)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_pred: np.ndarray, title: str):
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, display_labels=list(CLASSES), ax=ax, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc(curves: dict[str, list[dict]], title: str = "ROC (FAKE positive)"):
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, points in curves.items():
        ax.plot([p["fpr"] for p in points], [p["tpr"] for p in points], label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def robustness(rows: list[dict], bounds: dict[str, dict] | None = None,
               title: str = "Under attack (the mission's attack, white-box)"):
    """``rows``: dicts with ``model``, ``epsilon`` (1/255 units), ``balanced_accuracy`` and ``f1``; ``bounds``:
    the built-in sample's proven lower bound and ceiling per epsilon (:func:`pipeline.data.bounds.bounds_by_epsilon`),
    drawn as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if bounds:
        pts = sorted(bounds.values(), key=lambda b: b["epsilon"])
        axes[0].fill_between([b["epsilon"] for b in pts], [b["lower"] for b in pts], [b["upper"] for b in pts],
                             color="grey", alpha=0.2, label="sample: certified lower bound to ceiling")
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == name]
        for ax, key in zip(axes, ("balanced_accuracy", "f1")):
            ax.plot([r["epsilon"] for r in pts], [r[key] for r in pts], marker="o", label=name)
    axes[0].axhline(0.5, color="k", ls=":", lw=1, label="chance / constant answer")
    axes[0].set(xlabel="epsilon (/255)", ylabel="balanced accuracy", ylim=(0, 1), title=title)
    axes[1].set(xlabel="epsilon (/255)", ylabel="F1 (FAKE positive)", ylim=(0, 1),
                title="F1 (always-FAKE scores 0.667)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def corruptions(rows: list[dict]):
    """Balanced accuracy (bars) and ROC AUC (dots) per corruption and model: what a detector meets without an
    attacker. ``rows``: dicts with ``model``, ``corruption``, ``balanced_accuracy`` and ``roc_auc``."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["corruption"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = Figure(figsize=(9, 4))
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        mine = {r["corruption"]: r for r in rows if r["model"] == model}
        xs = np.arange(len(names)) + (i - (len(models) - 1) / 2) * width
        bars = ax.bar(xs, [mine[n]["balanced_accuracy"] for n in names], width, label=f"{model}: balanced accuracy")
        ax.plot(xs, [mine[n]["roc_auc"] for n in names], "o", color=bars.patches[0].get_facecolor(),
                markeredgecolor="k", label=f"{model}: ROC AUC")
    ax.axhline(0.5, color="k", ls=":", lw=1, label="chance / constant answer")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(ylim=(0, 1), ylabel="test subset", title="Without an attacker: re-saves, resizes, blur, noise")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    return fig


def reliability_diagram(rows: list[dict], brier: dict[str, float]):
    """Mean predicted P(FAKE) against the share really FAKE, per bin and set; the diagonal is calibrated."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for split in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == split]
        ax.plot([r["mean_predicted"] for r in mine], [r["fraction_fake"] for r in mine], marker="o",
                label=f"{split} (Brier {brier[split]:.4f})")
    ax.set(xlabel="mean predicted P(FAKE)", ylabel="share FAKE", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def evaluation_plots(y: np.ndarray, p_by_split: dict[str, np.ndarray], curve: list[dict], threshold: float,
                     folder: str | Path, bounds: dict[str, dict] | None = None) -> dict:
    """The evaluate stage's DVC plots (robustness curve, confusion rows, ROC points and reliability per split) as
    CSV files; returns the matplotlib figures of the same for MLflow."""
    from pipeline.judge.metrics import brier, reliability, roc_points

    folder = Path(folder)
    write_csv(curve, folder / "robustness.csv")
    rocs = {split: roc_points(y, p) for split, p in p_by_split.items()}
    calibration = []
    for split, p in p_by_split.items():
        rows = [{"set": split, **row} for row in reliability(y, p)]
        write_csv(rows, folder / f"calibration_{split}.csv")
        calibration += rows
    briers = {split: brier(y, p) for split, p in p_by_split.items()}
    figures = {"robustness.png": robustness(curve, bounds), "roc.png": roc(rocs),
               "reliability.png": reliability_diagram(calibration, briers)}
    for split, p in p_by_split.items():
        write_csv(confusion_rows(y, p, threshold), folder / f"confusion_{split}.csv")
        write_csv(rocs[split], folder / f"roc_{split}.csv")
        figures[f"confusion_{split}.png"] = confusion(y, (p >= threshold).astype(int), f"Test_dataset_{split}")
    return figures
