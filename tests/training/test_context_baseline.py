"""The context baseline (a bidirectional GRU over each conversation): it learns a signal that only the
neighbouring utterances carry, which the context-free logistic regression cannot; it is written beside
every run and printed by `cmath-mer baseline`."""
import json

import numpy as np
import torch

from cmath_mer.cli import main
from cmath_mer.data import ConversationDataset, make_synthetic, save_dataset
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.training import context_baseline
from cmath_mer.training.baseline import context_free_baseline
from cmath_mer.training.context_baseline import context_gru_baseline
from cmath_mer.training.prepare import make_splits

CLASSES = 3


def context_only(seed: int, conversations: int = 90) -> ConversationDataset:
    """Each utterance's features are a noisy code of its *previous* utterance's label (the first one's,
    of the next's), and say nothing about its own: only a model that looks at a neighbour can do better
    than chance."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 12, conversations)
    codes = rng.normal(size=(CLASSES, 16)).astype(np.float32)
    features, labels = [], []
    for n in lengths:
        y = rng.integers(0, CLASSES, n)
        shown = np.concatenate([[y[1]], y[:-1]])                      # the neighbour's label
        features.append(codes[shown] + 0.3 * rng.normal(size=(n, 16)).astype(np.float32))
        labels.append(y)
    splits = ["train" if i % 5 < 3 else ("valid" if i % 5 == 3 else "test") for i in range(conversations)]
    return ConversationDataset(
        features={"text": torch.from_numpy(np.concatenate(features))},
        speakers=torch.from_numpy(np.concatenate([np.arange(n) % 2 for n in lengths])),
        labels=torch.from_numpy(np.concatenate(labels)), cu_seqlens=cu_seqlens_from(lengths.tolist(), torch.int64),
        splits=splits, conversation_ids=[str(i) for i in range(conversations)],
        class_names=("a", "b", "c"), num_speakers=2)


def test_gru_learns_a_context_only_signal_the_context_free_baseline_cannot(monkeypatch):
    monkeypatch.setattr(context_baseline, "BATCH_CONVERSATIONS", 4)     # more steps in few epochs
    seed = int(torch.randint(0, 10_000, ()))
    data = context_only(seed)
    splits = make_splits(data, 0.1, seed)
    lr = context_free_baseline(data, splits)
    gru = context_gru_baseline(data, splits, seed=seed, epochs=10)
    assert lr["test"]["weighted_f1"] < 50                          # chance is ~33 with three balanced classes
    assert gru["test"]["weighted_f1"] > 70, (gru["test"], gru["history"])
    best = max(gru["history"], key=lambda r: r["valid_weighted_f1"])
    assert gru["epoch"] == best["epoch"] and gru["valid"]["weighted_f1"] == best["valid_weighted_f1"]


def test_gru_baseline_is_seeded_and_leaves_the_global_generator_alone():
    data = context_only(int(torch.randint(0, 10_000, ())), conversations=30)
    splits = make_splits(data, 0.1, 0)
    state = torch.get_rng_state()
    a = context_gru_baseline(data, splits, seed=3, epochs=2)
    assert torch.equal(torch.get_rng_state(), state)
    b = context_gru_baseline(data, splits, seed=3, epochs=2)
    assert a == b


def test_cli_baseline_prints_the_gru_beside_the_logistic_regression(tmp_path, capsys):
    data = make_synthetic(None, input_dims={"text": 12}, num_classes=3, conversations=20, min_length=3,
                          max_length=8, seed=int(torch.randint(0, 10_000, ())))
    path = save_dataset(data, tmp_path / "d.safetensors")
    assert main(["baseline", "--data", str(path), "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["C"] in (0.01, 0.1, 1.0, 10.0)
    gru = out["context_gru"]
    expected = context_gru_baseline(data, make_splits(data, 0.1, 1), seed=1)
    assert gru["epoch"] == expected["epoch"] and gru["test"] == expected["test"]
