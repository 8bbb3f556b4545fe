"""The context-free baseline every run is reported beside: a logistic regression that sees each utterance
alone (its modalities' features concatenated, standardised), fitted on the same training conversations,
its C chosen on the same validation conversations, scored on the same test conversations.

A model of conversations has to beat this to be worth its context; `train` writes it into metrics.json
(`baseline_context_free`) and `cmath-mer baseline` runs it alone.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cmath_mer.data import IGNORE_INDEX, ConversationDataset, DataError
from cmath_mer.training.metrics import classification_metrics

C_GRID = (0.01, 0.1, 1.0, 10.0)       # inverse L2 strength, chosen on validation weighted F1


def _rows(data: ConversationDataset, conversations: list[int]) -> np.ndarray:
    cu = data.cu_seqlens.tolist()
    if not conversations:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(cu[i], cu[i + 1]) for i in conversations])


def context_free_baseline(data: ConversationDataset, splits: dict[str, list[int]],
                          modalities: tuple[str, ...] | None = None, c_grid=C_GRID) -> dict:
    """{'C', 'modalities', 'valid': metrics, 'test': metrics or None} of the validation-selected logistic
    regression. splits: train/valid/test conversation indices (train.make_splits)."""
    mods = tuple(modalities or data.modalities)
    x = torch.cat([data.features[m] for m in mods], dim=1).numpy()          # (T, sum d_m)
    y = data.labels.numpy()
    rows = {}
    for split in ("train", "valid", "test"):
        r = _rows(data, splits.get(split, []))
        rows[split] = r[y[r] != IGNORE_INDEX]
    if len(rows["train"]) == 0 or len(np.unique(y[rows["train"]])) < 2:
        raise DataError(f"{data.source}: field labels: the context-free baseline needs labelled training "
                        "utterances of at least two classes")
    best = None
    for c in c_grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
            clf.fit(x[rows["train"]], y[rows["train"]])
        # without a validation split the training fit picks C (reported as such)
        select = "valid" if len(rows["valid"]) else "train"
        score = classification_metrics(y[rows[select]], clf.predict(x[rows[select]]), data.class_names)
        if best is None or score["weighted_f1"] > best[0]["weighted_f1"]:
            best = (score, c, clf)
    score, c, clf = best
    test = (classification_metrics(y[rows["test"]], clf.predict(x[rows["test"]]), data.class_names)
            if len(rows["test"]) else None)
    return {"model": "logistic regression, standardised concatenated features, one utterance at a time",
            "modalities": list(mods), "C": c, "selected_on": "valid" if len(rows["valid"]) else "train",
            "valid": score if len(rows["valid"]) else None, "test": test}
