"""Weighted F1 and accuracy (sklearn) over labelled utterances, in percent, and the confusion-matrix plot."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, confusion_matrix, f1_score

from cmath_mer.files import atomic_write


def classification_metrics(labels: np.ndarray, preds: np.ndarray, class_names: tuple[str, ...]) -> dict:
    keep = labels >= 0                                    # IGNORE_INDEX utterances are not scored
    y, p = labels[keep], preds[keep]
    classes = list(range(len(class_names)))
    per_class = f1_score(y, p, labels=classes, average=None, zero_division=0)
    return {
        "weighted_f1": 100.0 * f1_score(y, p, labels=classes, average="weighted", zero_division=0),
        "accuracy": 100.0 * accuracy_score(y, p),
        "per_class_f1": {name: 100.0 * float(f) for name, f in zip(class_names, per_class)},
        "utterances": int(keep.sum()),
    }


def save_confusion_matrix(labels: np.ndarray, preds: np.ndarray, class_names: tuple[str, ...],
                          path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keep = labels >= 0
    cm = confusion_matrix(labels[keep], preds[keep], labels=list(range(len(class_names))))
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))   # a kill leaves no torn file
    finally:
        plt.close(fig)


def save_training_curves(history: list[dict], path: Path, baseline: dict | None = None) -> None:
    """Training loss, validation and test weighted F1 per epoch (and the baseline's as lines), one PNG,
    written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for split, colour in (("valid", "tab:blue"), ("test", "tab:orange")):
        scores = [(r["epoch"], r[split]["weighted_f1"]) for r in history if r.get(split)]
        if scores:
            ax_f1.plot(*zip(*scores), marker="o", color=colour, label=f"CMATH {split}")
        if baseline and baseline.get(split):
            ax_f1.axhline(baseline[split]["weighted_f1"], color=colour, linestyle="--",
                          label=f"context-free baseline {split}")
    ax_f1.set(xlabel="epoch", ylabel="weighted F1 (%)", title="weighted F1")
    ax_f1.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
