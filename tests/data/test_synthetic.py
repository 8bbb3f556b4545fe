"""The synthetic corpus: shapes, determinism, emotional inertia, uneven modality quality, context-only
utterances, learnability (context beats a context-free probe), large generation."""
from __future__ import annotations

import time

import pytest
import torch

from cmath_mer.data import SPLITS, make_synthetic, validate_dataset

SMALL = {"text": 32, "audio": 32, "visual": 32}


def _ridge(x: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float = 10.0):
    """Least-squares probe on one-hot targets; returns a predict function."""
    xb = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    w = torch.linalg.solve(xb.T @ xb + lam * torch.eye(xb.shape[1], dtype=torch.float64),
                           xb.T @ torch.nn.functional.one_hot(y, num_classes).double())
    return lambda z: (torch.cat([z, torch.ones(len(z), 1)], 1).double() @ w).argmax(1)


def _with_neighbours(ds, m: str) -> torch.Tensor:
    """[x_t, x_{t-1}, x_{t+1}] with zeros across conversation boundaries."""
    x = ds.features[m]
    conv = torch.repeat_interleave(torch.arange(len(ds)), torch.tensor(ds.lengths()))
    parts = [x]
    for shift in (1, -1):
        same = torch.roll(conv, shift, 0) == conv
        parts.append(torch.where(same[:, None], torch.roll(x, shift, 0), torch.zeros_like(x)))
    return torch.cat(parts, 1)


@pytest.fixture(scope="module")
def probe_data():
    """Train and test corpora of the same task (same world_seed, different seeds), uniform class prior."""
    kw = dict(input_dims=SMALL, conversations=150, min_length=20, max_length=60, class_prior=(1,) * 6)
    train, _ = make_synthetic("iemocap", seed=1, return_truth=True, **kw)
    test, truth = make_synthetic("iemocap", seed=2, return_truth=True, **kw)
    return train, test, truth


@pytest.mark.parametrize("preset,dims,classes,speakers", [
    ("iemocap", {"text": 1024, "audio": 1582, "visual": 342}, 6, 2),
    ("meld", {"text": 1024, "audio": 300, "visual": 342}, 7, 9)])
def test_preset_shapes_lengths_splits(preset, dims, classes, speakers):
    ds = make_synthetic(preset, conversations=20, min_length=3, max_length=9, seed=0)
    validate_dataset(ds)
    T = int(ds.cu_seqlens[-1])
    assert ds.input_dims == dims and ds.num_classes == classes and ds.num_speakers == speakers
    assert all(ds.features[m].shape == (T, d) and ds.features[m].dtype == torch.float32 for m, d in dims.items())
    assert ds.labels.shape == ds.speakers.shape == (T,) and ds.labels.dtype == torch.int64
    assert len(ds) == 20 and all(3 <= n <= 9 for n in ds.lengths()) and sum(ds.lengths()) == T
    assert int(ds.labels.max()) < classes and int(ds.speakers.max()) < speakers
    assert [ds.splits.count(s) for s in SPLITS] == [14, 2, 4]


def test_defaults_look_like_the_corpora():
    ds = make_synthetic("iemocap")
    assert len(ds) == 151 and ds.speaker_names == ("M", "F") and set(ds.splits) == set(SPLITS)
    assert all(20 <= n <= 110 for n in ds.lengths())
    meld = make_synthetic("meld", input_dims={"text": 8, "audio": 8, "visual": 8})
    assert len(meld) == 1433 and max(meld.lengths()) <= 24
    counts = torch.bincount(meld.labels, minlength=7)
    assert counts[0] == counts.max()                          # neutral dominates, as in MELD


def test_custom_dims_lengths_modalities_and_splits():
    ds = make_synthetic(None, input_dims={"visual": 5, "text": 7}, num_classes=3, num_speakers=4,
                        lengths=[1, 2, 30, 4], split_fractions=(1, 0, 1), seed=5)
    assert ds.modalities == ("text", "visual") and ds.input_dims == {"text": 7, "visual": 5}
    assert ds.lengths() == [1, 2, 30, 4] and ds.class_names == ("class0", "class1", "class2")
    assert sorted(ds.splits) == ["test", "test", "train", "train"]
    assert make_synthetic("meld", modalities=("audio",), conversations=3).modalities == ("audio",)
    with pytest.raises(ValueError, match="input_dims"):
        make_synthetic(None, num_classes=3)
    with pytest.raises(ValueError, match="inertia"):
        make_synthetic("iemocap", inertia=1.5)


def test_deterministic_by_seed_and_independent_of_threads():
    kw = dict(input_dims={"text": 40, "audio": 24}, lengths=[9000, 15000, 11], seed=7)
    a, b = make_synthetic("iemocap", threads=1, **kw), make_synthetic("iemocap", threads=3, **kw)
    c = make_synthetic("iemocap", **{**kw, "seed": 8})
    for m in a.modalities:
        assert torch.equal(a.features[m], b.features[m])
        assert not torch.equal(a.features[m], c.features[m])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.speakers, b.speakers) and a.splits == b.splits
    assert not torch.equal(a.labels, c.labels)


def test_emotional_inertia():
    prior = torch.tensor([648, 1084, 1708, 1103, 1041, 1849], dtype=torch.float64)
    chance = float(((prior / prior.sum()) ** 2).sum())          # P(two independent labels agree)
    for inertia in (0.8, 0.5, 0.0):
        ds = make_synthetic("iemocap", input_dims={"text": 2}, conversations=300, inertia=inertia, seed=3)
        same, n = 0, 0
        for a, b in zip(ds.cu_seqlens[:-1].tolist(), ds.cu_seqlens[1:].tolist()):
            y = ds.labels[a:b]
            same += int((y[1:] == y[:-1]).sum())
            n += b - a - 1
        expected = inertia + (1 - inertia) * chance
        assert abs(same / n - expected) < 0.03, (inertia, same / n, expected)
    assert expected == pytest.approx(chance) and 0.8 + 0.2 * chance > chance + 0.5


def test_signal_strength_text_over_audio_over_visual(probe_data):
    train, test, _ = probe_data
    acc = {m: (_ridge(train.features[m], train.labels, 6)(test.features[m]) == test.labels).float().mean().item()
           for m in train.modalities}
    assert acc["text"] > acc["audio"] + 0.05 > acc["visual"] + 0.1 > 1 / 6 + 0.15, acc


def test_context_only_utterances_are_at_chance_alone_but_neighbours_reveal_them(probe_data):
    train, test, truth = probe_data
    dark = ~truth["informative"]
    assert 0.1 < dark.float().mean() < 0.2                              # default context_only = 0.15
    for m in test.modalities:                                          # no signal in any modality
        hit = _ridge(train.features[m], train.labels, 6)(test.features[m]) == test.labels
        assert abs(hit[dark].float().mean().item() - 1 / 6) < 0.05, m
    with_ctx = _ridge(_with_neighbours(train, "text"), train.labels, 6)(_with_neighbours(test, "text"))
    assert (with_ctx == test.labels)[dark].float().mean().item() > 1 / 6 + 0.25


def test_context_model_beats_context_free_single_modality_probe(probe_data):
    train, test, _ = probe_data
    free = _ridge(train.features["text"], train.labels, 6)(test.features["text"])
    x_tr = torch.cat([_with_neighbours(train, m) for m in train.modalities], 1)
    x_te = torch.cat([_with_neighbours(test, m) for m in test.modalities], 1)
    ctx = _ridge(x_tr, train.labels, 6)(x_te)
    acc_free = (free == test.labels).float().mean().item()
    acc_ctx = (ctx == test.labels).float().mean().item()
    assert acc_ctx > acc_free + 0.1, (acc_free, acc_ctx)


def test_one_huge_conversation_is_fast():
    t0 = time.perf_counter()
    ds = make_synthetic("meld", input_dims={"text": 16, "audio": 8, "visual": 4}, lengths=[100_000], seed=1)
    elapsed = time.perf_counter() - t0
    assert ds.lengths() == [100_000] and ds.features["text"].shape == (100_000, 16)
    assert ds.splits in (["train"], ["valid"], ["test"])
    assert len(torch.unique(ds.speakers)) <= 4 and torch.isfinite(ds.features["audio"]).all()
    assert elapsed < 10, elapsed
