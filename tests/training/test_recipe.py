"""The training recipe: learning-rate schedule, early stopping, tempered class weights, label smoothing,
the context-free baseline beside every run, and several seeds summarised as mean and std."""
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cmath_mer.cli import main
from cmath_mer.data import IGNORE_INDEX, make_synthetic, save_dataset
from cmath_mer.model.cmath import weighted_cross_entropy
from cmath_mer.training import train as train_module
from cmath_mer.training.baseline import C_GRID, context_free_baseline
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.prepare import build_config, inverse_frequency_weights, make_splits
from cmath_mer.training.seeds import train_seeds
from cmath_mer.training.train import learning_rate, train

from helpers import train_interrupted_after_epoch_1

SMALL = dict(d_model=32, n_heads=4, n_layers=1, d_hidden=32, dropout=0.1)
DIMS = {"text": 24, "audio": 20}
quiet = dict(progress=False, log=lambda *_: None)


def corpus(seed, conversations=24):
    return make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=conversations, min_length=6,
                          max_length=20, seed=seed)


def test_learning_rate_warms_up_linearly_then_cosine_decays_to_zero():
    rng = random.Random()
    steps, epochs, warm = rng.randint(3, 40), rng.randint(2, 9), rng.choice([0.0, 0.5, 1.0, 1.5])
    lr = 10 ** rng.uniform(-5, -2)
    tc = TrainConfig(lr=lr, epochs=epochs, warmup_epochs=warm, lr_schedule="cosine")
    total, warm_steps = steps * epochs, warm * steps
    lrs = [learning_rate(tc, s, steps) for s in range(total)]
    assert all(0 < x <= lr * (1 + 1e-12) for x in lrs[:-1])
    rising = [x for s, x in enumerate(lrs) if s < warm_steps - 1]
    assert all(b > a for a, b in zip(rising, rising[1:]))                       # warmup: increasing
    if warm_steps:
        assert math.isclose(lrs[0], lr / warm_steps)
    falling = lrs[math.ceil(warm_steps):]
    assert all(b <= a for a, b in zip(falling, falling[1:]))                    # then never increasing
    assert learning_rate(tc, total, steps) == pytest.approx(0.0, abs=1e-12)     # 0 at the end of `epochs`
    const = TrainConfig(lr=lr, epochs=epochs, warmup_epochs=0.0, lr_schedule="constant")
    assert {learning_rate(const, s, steps) for s in range(total)} == {lr}
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_early_stopping_stops_patience_epochs_after_the_best_and_resume_does_not_train_on(tmp_path, monkeypatch):
    data = corpus(int(torch.randint(0, 10_000, ())))
    config = build_config(data, "iemocap", **SMALL)
    patience, peak = 2, 3
    real = train_module.evaluate_split
    calls = {"valid": 0}

    def scripted(model, data_, conversations, **options):
        metrics, y, p = real(model, data_, conversations, **options)
        if conversations == make_splits(data, 0.1, 0)["valid"]:
            calls["valid"] += 1                  # validation F1 rises to epoch `peak`, then falls
            metrics = {**metrics, "weighted_f1": 50.0 - abs(calls["valid"] - peak)}
        return metrics, y, p

    monkeypatch.setattr(train_module, "evaluate_split", scripted)
    tc = TrainConfig(epochs=20, patience=patience, batch_utterances=128, baseline=False)
    metrics = train(data, config, tc, tmp_path, **quiet)
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, peak + patience + 1))
    assert metrics["selected_by_validation"]["epoch"] == peak
    again = train(data, config, tc, tmp_path, resume=True, **quiet)
    assert len(again["history"]) == peak + patience


def test_class_weight_power_tempers_inverse_frequency():
    data = corpus(int(torch.randint(0, 10_000, ())))
    convs = data.indices("train")
    labels = torch.cat([data.labels[int(data.cu_seqlens[i]):int(data.cu_seqlens[i + 1])] for i in convs])
    counts = torch.bincount(labels[labels != IGNORE_INDEX], minlength=4).double()
    inverse = counts.sum() / (4 * counts)
    for power in (0.0, 0.5, 1.0):
        w = inverse_frequency_weights(data, convs, power).double()
        torch.testing.assert_close(w, inverse ** power, rtol=1e-5, atol=0)


def test_label_smoothing_matches_the_smoothed_target_cross_entropy():
    T, K, eps = 37, 5, float(torch.rand(()) * 0.3)
    logits, labels = torch.randn(T, K), torch.randint(0, K, (T,))
    labels[::4] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    target = torch.full((T, K), eps / K)
    target[keep] += (1 - eps) * F.one_hot(labels[keep], K)
    expected = -(target[keep] * logits[keep].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, None, eps), expected)


def test_baseline_is_the_validation_selected_logistic_regression(tmp_path):
    data = corpus(int(torch.randint(0, 10_000, ())), conversations=30)
    splits = make_splits(data, 0.1, 0)
    result = context_free_baseline(data, splits)
    cu = data.cu_seqlens.tolist()
    rows = {s: np.concatenate([np.arange(cu[i], cu[i + 1]) for i in splits[s]]) for s in splits}
    x = torch.cat([data.features[m] for m in data.modalities], 1).numpy()
    y = data.labels.numpy()
    fits = {c: make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[rows["train"]],
                                                                                            y[rows["train"]])
            for c in C_GRID}
    valid = {c: 100 * f1_score(y[rows["valid"]], f.predict(x[rows["valid"]]), average="weighted")
             for c, f in fits.items()}
    assert result["C"] == max(valid, key=valid.get)
    assert result["valid"]["weighted_f1"] == pytest.approx(max(valid.values()))
    chosen = fits[result["C"]]
    assert result["test"]["weighted_f1"] == pytest.approx(
        100 * f1_score(y[rows["test"]], chosen.predict(x[rows["test"]]), average="weighted"))


def test_every_run_writes_its_baseline_and_curves_and_the_cli_runs_it_alone(tmp_path, capsys):
    seed = int(torch.randint(0, 10_000, ()))
    data = corpus(seed)
    path = tmp_path / "data.safetensors"
    save_dataset(data, path)
    lines = []
    metrics = train(data, build_config(data, "iemocap", **SMALL), TrainConfig(epochs=2, seed=seed),
                    tmp_path / "run", progress=False, log=lines.append)
    base = metrics["baseline_context_free"]
    assert base["modalities"] == list(data.modalities) and base["test"]["weighted_f1"] >= 0
    assert any(line.startswith("context-free baseline") for line in lines)
    assert (tmp_path / "run" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["baseline", "--data", str(path), "--seed", str(seed)]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["C"] == base["C"]
    assert alone["test"]["weighted_f1"] == pytest.approx(base["test"]["weighted_f1"])


def test_several_seeds_are_summarised_as_mean_and_std(tmp_path):
    data = corpus(int(torch.randint(0, 10_000, ())))
    config = build_config(data, "iemocap", **SMALL)
    seeds = [3, 11]
    summary = train_seeds(data, config, TrainConfig(epochs=2), tmp_path, seeds, **quiet)
    per_seed = [json.loads((tmp_path / f"seed-{s}" / "metrics.json").read_text()) for s in seeds]
    f1 = [m["selected_by_validation"]["weighted_f1"] for m in per_seed]
    base = [m["baseline_context_free"]["test"]["weighted_f1"] for m in per_seed]
    assert summary["test_weighted_f1"]["values"] == f1
    assert summary["test_weighted_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert summary["test_weighted_f1"]["std"] == pytest.approx(np.std(f1, ddof=1))
    assert summary["gain_over_baseline"]["values"] == pytest.approx([a - b for a, b in zip(f1, base)])
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert json.loads((tmp_path / f"seed-{seeds[1]}" / "train_config.json").read_text())["seed"] == seeds[1]


def test_without_the_variational_sample_training_forward_does_not_depend_on_the_seed():
    data = corpus(int(torch.randint(0, 10_000, ())), conversations=6)
    batch = data.batch(list(range(6)))
    from cmath_mer.model.cmath import CMATH
    for sample, same in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = CMATH(build_config(data, "iemocap", **{**SMALL, "dropout": 0.0}, variational_sample=sample)).train()
        a, b = model(batch, seed=1).logits, model(batch, seed=2).logits
        assert torch.equal(a, b) == same


def test_sweep_runs_every_recipe_and_seed_and_sorts_the_table_by_validation(tmp_path, capsys):
    seed = int(torch.randint(0, 10_000, ()))
    path = tmp_path / "data.safetensors"
    save_dataset(corpus(seed, conversations=16), path)
    grid = {"tiny": {"model": SMALL, "train": {"epochs": 1}},
            "tiny_nocw": {"model": {**SMALL, "class_weights": False}, "train": {"epochs": 1, "lr": 3e-3}}}
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    out = tmp_path / "sweep"
    assert main(["sweep", "--data", str(path), "--grid", str(tmp_path / "grid.json"), "--seeds", "1,2",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert set(result["results"]) == set(grid)
    for name in grid:
        for s in (1, 2):
            assert (out / name / f"seed-{s}" / "metrics.json").exists()
        assert result["results"][name]["seeds"] == [1, 2]
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| tiny")]
    order = [line.split("|")[1].strip() for line in table]
    valid = {n: result["results"][n]["valid_weighted_f1"]["mean"] for n in grid}
    assert order == sorted(grid, key=lambda n: -valid[n])
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"model": {"n_head": 2}}}))
    assert main(["sweep", "--data", str(path), "--grid", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "n_head" in capsys.readouterr().err


def test_weight_average_follows_the_ema_formula_and_applied_restores_the_weights():
    from cmath_mer.training.ema import WeightAverage
    model = torch.nn.Linear(5, 3)
    decay = float(torch.empty(()).uniform_(0.5, 0.99))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    avg = WeightAverage(model, decay)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        for n, p in model.named_parameters():
            expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with avg.applied(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), raw[n])


def test_the_decay_warmup_ramps_in_as_min_decay_1_plus_n_over_10_plus_n():
    from cmath_mer.training.ema import WeightAverage
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    model = torch.nn.Linear(7, 4)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    decay = float(torch.empty(()).uniform_(0.9, 0.999))
    avg = WeightAverage(model, decay, warmup=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))             # fresh random weights, far from the initial ones
    avg.update(model)                                # update n = 0: decay min(decay, 1/10) = 0.1
    for n, p in model.named_parameters():
        torch.testing.assert_close(avg.average[n], 0.1 * initial[n] + 0.9 * p.detach())
    assert avg.updates == 1
    expected = {n: t.clone() for n, t in avg.average.items()}
    for k in range(1, 40):
        d = min(decay, (1 + k) / (10 + k))
        assert avg.current_decay() == pytest.approx(d)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(model)
        for n, p in model.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    for n in expected:
        torch.testing.assert_close(avg.average[n], expected[n])
    assert WeightAverage(model, decay, warmup=True).current_decay() == pytest.approx(0.1)
    late = WeightAverage(model, decay, warmup=True)
    late.updates = 100_000                           # far along the ramp: the full decay
    assert late.current_decay() == decay
    assert WeightAverage(model, decay).current_decay() == decay      # no warmup: constant, as before


@pytest.mark.parametrize("warmup", [False, True])
def test_with_ema_the_checkpoint_evaluates_the_average_and_resume_equals_an_uninterrupted_run(tmp_path, warmup):
    from safetensors.torch import load_file

    from cmath_mer.training.checkpoint import read_metadata
    from cmath_mer.training.evaluate import load_trained
    seed = int(torch.randint(0, 10_000, ()))
    data = corpus(seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    # with the warmup, a resume that restarted the ramp at update 0 would average differently from epoch 2
    tc = TrainConfig(epochs=3, batch_utterances=96, seed=seed, ema_decay=0.9, ema_warmup=warmup, baseline=False,
                     keep_last=True)
    full = train(data, config, tc, tmp_path / "full", **quiet)
    # best.safetensors holds the weights evaluation uses: the average of the selected epoch (epoch 1's best is
    # epoch 1, whose last.safetensors holds both the weights and their average)
    one = TrainConfig(**{**dataclasses.asdict(tc), "epochs": 1})
    train(data, config, one, tmp_path / "one", **quiet)
    best, last = (load_file(str(tmp_path / "one" / f"{n}.safetensors")) for n in ("best", "last"))
    model = load_trained(tmp_path / "one")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), last[f"average.{name}"]) and torch.equal(best[f"model.{name}"], p), name
    assert any(not torch.equal(last[f"average.{n}"], last[f"model.{n}"]) for n, _ in model.named_parameters())
    resumed = train_interrupted_after_epoch_1(data, config, tc, tmp_path / "cut")
    strip = lambda h: [{k: v for k, v in r.items() if k != "utterances_per_second"} for r in h]
    assert strip(resumed["history"]) == strip(full["history"])
    a, b = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = read_metadata(tmp_path / "cut" / "last.safetensors")["state"]
    assert state["ema_updates"] == state["global_step"] > 0      # one update a step, the count kept on resume


def test_standardized_inputs_use_training_statistics_and_travel_with_the_checkpoint(tmp_path):
    from cmath_mer.model.cmath import CMATH
    from cmath_mer.training.evaluate import load_trained
    from cmath_mer.training.prepare import set_input_statistics
    seed = int(torch.randint(0, 10_000, ()))
    data = corpus(seed, conversations=12)
    for m in data.modalities:                                   # features far from unit scale
        data.features[m] = data.features[m] * 40.0 + 7.0
    data.features["text"][:, 3] = 2.5                           # a constant feature is centred, not blown up
    config = build_config(data, "iemocap", **{**SMALL, "dropout": 0.0}, standardize_inputs=True)
    torch.manual_seed(seed)
    model = CMATH(config).eval()
    train_convs = data.indices("train")
    set_input_statistics(model, data, train_convs)
    cu = data.cu_seqlens.tolist()
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in train_convs])
    for m in data.modalities:
        x = data.features[m][rows].double()
        std = x.std(0, unbiased=False)
        torch.testing.assert_close(model.input_mean_text if m == "text" else model.input_mean_audio,
                                   x.mean(0).float())
        expected_std = torch.where(std > 1e-6, std, torch.ones_like(std)).float()
        torch.testing.assert_close(getattr(model, f"input_std_{m}"), expected_std)
    # the same weights without standardisation, fed standardised features, give the same logits
    plain = CMATH(build_config(data, "iemocap", **{**SMALL, "dropout": 0.0})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("input_")})
    batch = data.batch(list(range(len(data))))
    pre = type(batch)({m: model.standardized(m, x) for m, x in batch.features.items()}, batch.speakers,
                      batch.labels, batch.cu_seqlens)
    assert torch.isfinite(pre.features["text"]).all() and pre.features["text"][:, 3].abs().max() < 1e-5
    torch.testing.assert_close(model(batch, with_loss=False).logits, plain(pre, with_loss=False).logits)
    train(data, config, TrainConfig(epochs=1, seed=seed, baseline=False), tmp_path / "run", **quiet)
    loaded = load_trained(tmp_path / "run")
    torch.testing.assert_close(loaded.input_std_audio, model.input_std_audio)
