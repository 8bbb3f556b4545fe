"""The context baseline every run is also reported beside: a bidirectional GRU over each conversation's
utterance features (modalities concatenated and standardised on train, plus the speaker's one-hot index),
trained on the same training conversations, its epoch chosen on the same validation conversations, scored on
the same test conversations. The simplest model that sees the conversation: CMATH has to beat it to be worth
its complexity, as the logistic regression of baseline.py says what context is worth at all.

`train` writes it into metrics.json (`baseline_context_gru`); `cmath-mer baseline` runs it beside the
logistic regression.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from cmath_mer.data import IGNORE_INDEX, ConversationDataset, DataError
from cmath_mer.training.metrics import classification_metrics

HIDDEN = 128
EPOCHS = 20
LR = 1e-3
DROPOUT = 0.3
BATCH_CONVERSATIONS = 32
CLASS_WEIGHT_POWER = 0.5          # tempered inverse-frequency weights, as the `meld` recipe's


class BiGRU(torch.nn.Module):
    def __init__(self, d_in: int, classes: int, hidden: int = HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        self.inp = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(d_in, hidden), torch.nn.ReLU())
        self.gru = torch.nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(2 * hidden, classes))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_in) padded conversations -> (B, L, classes)."""
        packed = pack_padded_sequence(self.inp(x), lengths, batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])
        return self.out(h)


def _inputs(data: ConversationDataset, modalities: tuple[str, ...], train: list[int]) -> torch.Tensor:
    """(T, d) per-utterance input: features standardised with the training utterances' statistics, then the
    speaker's one-hot index."""
    x = torch.cat([data.features[m].float() for m in modalities], dim=1)
    cu = data.cu_seqlens.tolist()
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in train])
    mean, std = x[rows].mean(0), x[rows].std(0).clamp_min(1e-6)
    speakers = F.one_hot(data.speakers.clamp(0, data.num_speakers - 1), max(1, data.num_speakers)).float()
    return torch.cat([(x - mean) / std, speakers], dim=1)


def _batch(x: torch.Tensor, y: torch.Tensor, cu: list[int], conversations: list[int]):
    parts = [slice(cu[i], cu[i + 1]) for i in conversations]
    lengths = torch.tensor([s.stop - s.start for s in parts])
    return (pad_sequence([x[s] for s in parts], batch_first=True),
            pad_sequence([y[s] for s in parts], batch_first=True, padding_value=IGNORE_INDEX), lengths)


@torch.no_grad()
def _predict(model: BiGRU, x, y, cu, conversations: list[int]) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    labels, preds = [], []
    for start in range(0, len(conversations), 256):
        xb, yb, lengths = _batch(x, y, cu, conversations[start:start + 256])
        keep = yb != IGNORE_INDEX
        labels.append(yb[keep])
        preds.append(model(xb, lengths).argmax(-1)[keep])
    model.train()
    return torch.cat(labels).numpy(), torch.cat(preds).numpy()


def _class_weights(y: torch.Tensor, classes: int) -> torch.Tensor:
    y = y[y != IGNORE_INDEX]
    counts = torch.bincount(y, minlength=classes).float()
    weights = (y.numel() / (classes * counts.clamp_min(1))) ** CLASS_WEIGHT_POWER
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def context_gru_baseline(data: ConversationDataset, splits: dict[str, list[int]],
                         modalities: tuple[str, ...] | None = None, seed: int = 0, epochs: int = EPOCHS) -> dict:
    """{'epoch', 'modalities', 'valid': metrics, 'test': metrics or None, 'history'} of the biGRU at its
    validation-chosen epoch. splits: train/valid/test conversation indices (train.make_splits)."""
    mods = tuple(modalities or data.modalities)
    train = list(splits.get("train", []))
    y = data.labels
    cu = data.cu_seqlens.tolist()
    train_labels = torch.cat([y[cu[i]:cu[i + 1]] for i in train]) if train else y[:0]
    if len(set(train_labels[train_labels != IGNORE_INDEX].tolist())) < 2:
        raise DataError(f"{data.source}: field labels: the context baseline needs labelled training "
                        "utterances of at least two classes")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):                   # the caller's random stream is left as it was
        torch.manual_seed(seed)
        x = _inputs(data, mods, train)
        model = BiGRU(x.shape[1], data.num_classes)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        weights = _class_weights(train_labels, data.num_classes)
        select = "valid" if splits.get("valid") else "train"
        rng = random.Random(int(torch.randint(0, 2**31, (), generator=generator)))
        best, history = None, []
        for epoch in range(1, epochs + 1):
            order = train[:]
            rng.shuffle(order)
            for start in range(0, len(order), BATCH_CONVERSATIONS):
                xb, yb, lengths = _batch(x, y, cu, order[start:start + BATCH_CONVERSATIONS])
                logits = model(xb, lengths)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), weight=weights,
                                       ignore_index=IGNORE_INDEX)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            valid = classification_metrics(*_predict(model, x, y, cu, splits[select]), data.class_names)
            history.append({"epoch": epoch, f"{select}_weighted_f1": valid["weighted_f1"]})
            if best is None or valid["weighted_f1"] > best[0]["weighted_f1"]:
                test = (classification_metrics(*_predict(model, x, y, cu, splits["test"]), data.class_names)
                        if splits.get("test") else None)
                best = (valid, epoch, test)
    valid, epoch, test = best
    return {"model": f"bidirectional GRU ({HIDDEN} per direction) over each conversation, standardised "
                     f"concatenated features + speaker one-hot", "modalities": list(mods), "epoch": epoch,
            "selected_on": select, "valid": valid if select == "valid" else None, "test": test,
            "history": history}
