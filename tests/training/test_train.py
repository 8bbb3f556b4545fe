"""Training end to end on the reference path: learning, metrics.json, resume after interruption, CLI."""
import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from cmath_mer.cli import loading, main
from cmath_mer.data import load_dataset, make_synthetic, save_dataset, write_peer_pickle
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.prepare import build_config
from cmath_mer.training.train import train

SMALL = dict(d_model=32, n_heads=4, n_layers=1, d_hidden=32, dropout=0.1)
DIMS = {"text": 48, "audio": 40, "visual": 24}


def small_corpus(seed: int, conversations: int = 60):
    return make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=conversations, min_length=12,
                          max_length=40, seed=seed)


def context_free_baseline(data) -> float:
    """Best single-modality, context-free linear classifier: test weighted F1 in percent."""
    cu = data.cu_seqlens.tolist()
    rows = {s: torch.cat([torch.arange(cu[i], cu[i + 1]) for i in data.indices(s)]) for s in ("train", "test")}
    y = data.labels.numpy()
    scores = []
    for x in data.features.values():
        clf = LogisticRegression(max_iter=500).fit(x.numpy()[rows["train"]], y[rows["train"]])
        scores.append(100 * f1_score(y[rows["test"]], clf.predict(x.numpy()[rows["test"]]), average="weighted"))
    return max(scores)


def test_cmath_learns_synthetic_conversations_beyond_context_free_baseline(tmp_path):
    seed = int(torch.randint(0, 10_000, ()))
    data = small_corpus(seed)
    config = build_config(data, "iemocap", **SMALL)
    metrics = train(data, config, TrainConfig(epochs=12, lr=2e-3, batch_utterances=256, seed=seed), tmp_path,
                    progress=False, log=lambda *_: None)
    sel = metrics["selected_by_validation"]
    chance = 100 / data.num_classes
    baseline = context_free_baseline(data)
    assert sel["weighted_f1"] > chance + 30, (sel, chance)
    assert sel["weighted_f1"] > baseline + 5, (sel["weighted_f1"], baseline)
    assert set(sel) >= {"weighted_f1", "accuracy", "per_class_f1", "epoch"}
    assert set(sel["per_class_f1"]) == set(data.class_names)
    assert set(metrics["best_test_epoch"]) == {"weighted_f1", "accuracy", "epoch"}
    assert metrics["best_test_epoch"]["weighted_f1"] >= sel["weighted_f1"]
    for name in ("config.json", "best.safetensors", "metrics.json", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "last.safetensors").exists()                # finished: the optimizer state went
    assert not list(tmp_path.glob(".*.tmp")), "a temporary checkpoint file was left behind"


class Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    seed = int(torch.randint(0, 10_000, ()))
    data = small_corpus(seed, conversations=20)
    config = build_config(data, "iemocap", **SMALL)
    tcfg = TrainConfig(epochs=3, lr=1e-3, batch_utterances=128, seed=seed, keep_last=True)
    full = train(data, config, tcfg, tmp_path / "full", progress=False, log=lambda *_: None)

    def crash_after_first_epoch(line):
        if line.startswith("epoch   1/"):
            raise Interrupt
    with pytest.raises(Interrupt):
        train(data, config, tcfg, tmp_path / "cut", progress=False, log=crash_after_first_epoch)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    resumed = train(data, config, tcfg, tmp_path / "cut", resume=True, progress=False, log=lambda *_: None)
    strip = lambda h: [{k: v for k, v in row.items() if k != "utterances_per_second"} for row in h]
    assert strip(resumed["history"]) == strip(full["history"])
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_train_evaluate_predict_on_a_peer_pickle(tmp_path, capsys):
    seed = int(torch.randint(0, 10_000, ()))
    data = small_corpus(seed, conversations=16)
    pkl = tmp_path / "IEMOCAP_features.pkl"
    write_peer_pickle(data, pkl, layout="12")
    out = tmp_path / "run"
    small = json.dumps({k: v for k, v in SMALL.items()})
    assert main(["train", "--data", str(pkl), "--preset", "iemocap", "--modalities", "text,audio",
                 "--epochs", "2", "--seed", str(seed), "--set", small, "--out", str(out), "--no-progress"]) == 0
    assert "weighted F1" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["modalities"] == ["text", "audio"] and config["input_dims"] == {"text": 48, "audio": 40}
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(pkl)]) == 0
    assert "weighted_f1" in json.loads(capsys.readouterr().out)
    csv_path = tmp_path / "pred.csv"
    assert main(["predict", "--checkpoint", str(out), "--data", str(pkl), "--out", str(csv_path)]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == int(data.cu_seqlens[-1])
    assert {r["conversation"] for r in rows} == set(data.conversation_ids)
    names = load_dataset(pkl).class_names                       # a peer pickle carries no class names
    assert set(rows[0]) == {"conversation", "split", "utterance", "speaker", "label", "prediction",
                            *[f"p_{c}" for c in names]}
    assert [r["conversation"] for r in rows] == [c for c, n in zip(data.conversation_ids, data.lengths())
                                                 for _ in range(n)]                  # file order
    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)


def test_evaluate_refuses_data_of_other_dimensions(tmp_path, capsys):
    data = small_corpus(1, conversations=8)
    out = tmp_path / "run"
    config = build_config(data, "iemocap", **SMALL)
    train(data, config, TrainConfig(epochs=1, batch_utterances=256), out, progress=False, log=lambda *_: None)
    other = make_synthetic(None, input_dims={**DIMS, "audio": 41}, num_classes=4, conversations=4, seed=2)
    path = tmp_path / "other.safetensors"
    save_dataset(other, path)
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(path)]) == 1   # a data error
    err = capsys.readouterr().err
    assert "other.safetensors" in err and "audio" in err and "41" in err and "40" in err


def test_cli_resume_uses_the_runs_own_config_and_epochs(tmp_path, capsys):
    data = small_corpus(3, conversations=8)
    path = tmp_path / "data.safetensors"
    save_dataset(data, path)
    out = tmp_path / "run"
    small = json.dumps(SMALL)
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--modalities", "text,visual", "--epochs", "1", "--set", small,
                 "--out", str(out), "--no-progress", "--keep-last"]) == 0
    # resume with no modalities, no --set, no --epochs: the run's own settings; then extend by --epochs
    assert main(["train", "--data", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 1
    assert main(["train", "--data", str(path), "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((out / "config.json").read_text())["modalities"] == ["text", "visual"]
    capsys.readouterr()
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.parametrize("seeds_option", ["--seed", "--seeds"])
def test_evaluate_on_synthetic_data_rebuilds_the_corpus_the_run_trained_on(tmp_path, monkeypatch, capsys,
                                                                            seeds_option):
    """`--data synthetic` is a corpus built from the run's data seed: --seed S builds it with S, --seeds
    (one run per seed) with 0. evaluate --data synthetic reproduces the test metrics in metrics.json (the
    preset's corpus is made small here to keep the test quick; the seed and preset still come from the CLI)."""
    real = loading.make_synthetic
    monkeypatch.setattr(loading, "make_synthetic", lambda preset, seed: real(
        preset, seed=seed, input_dims=DIMS, conversations=12, min_length=6, max_length=20))
    seed = int(torch.randint(1, 10_000, ()))
    out = tmp_path / "run"
    assert main(["train", "--data", "synthetic", seeds_option, str(seed), "--epochs", "1", "--set",
                 json.dumps(SMALL), "--out", str(out), "--no-progress"]) == 0
    run = out if seeds_option == "--seed" else out / f"seed-{seed}"
    selected = json.loads((run / "metrics.json").read_text())["selected_by_validation"]
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", "synthetic"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert {k: evaluated[k] for k in ("weighted_f1", "accuracy", "per_class_f1")} == \
        {k: selected[k] for k in ("weighted_f1", "accuracy", "per_class_f1")}
    monkeypatch.setattr(loading, "data_seed", lambda state: seed + 1)       # another corpus: refused, not scored
    assert main(["evaluate", "--checkpoint", str(run), "--data", "synthetic"]) == 1
    assert f"rebuilt with seed {seed + 1} is not the one the run" in capsys.readouterr().err
