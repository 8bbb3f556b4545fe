"""Issue 10, the training engine, on the CPU: no host read inside a training step (a spy on Tensor.item and
friends), bf16 autocast learns as well as fp32, fp16 with GradScaler skips steps with inf gradients
without touching the weights, resume under bf16/fp16 equals an uninterrupted run, --deterministic repeats
a run bit for bit, gradient accumulation gives the gradients of the whole batch, and the CLI stores and
keeps the new settings."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from cmath_mer import engine
from cmath_mer.cli import main
from cmath_mer.config import TrainConfig
from cmath_mer.data import make_synthetic, save_dataset
from cmath_mer.model import CMATH
from cmath_mer.train import build_config, train
from helpers import train_interrupted_after_epoch_1

SMALL = dict(d_model=32, n_heads=4, n_layers=1, d_hidden=32, dropout=0.1)
DIMS = {"text": 24, "audio": 20}
quiet = dict(progress=False, log=lambda *_: None)


def corpus(seed: int = 0, conversations: int = 24, **kw):
    return make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=conversations, min_length=6,
                          max_length=20, seed=seed, **kw)


def strip(history):
    return [{k: v for k, v in row.items() if k != "utterances_per_second"} for row in history]


def same_files(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ------------------------------------------------------------------------------------- no host sync

HOST_READS = ("item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_step_reads_no_tensor_on_the_host(tmp_path, monkeypatch, precision):
    """Every host read of a tensor during a training step is recorded; only the logging points (between
    steps) may read. torch's own AdamW reads its step counter, a host tensor by design (state_steps stay on
    the CPU unless capturable), and the reference attention's per-conversation loop reads cu_seqlens
    (the Triton path does not; the custom-op issue removes it from the reference under compile): those two
    callers are named and allowed, nothing else."""
    allowed_callers = ("torch/optim/", "kernels/attention/naive.py")
    bad, logged = [], []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            where = engine.phase()
            if where == "step":
                caller = sys._getframe(1).f_code.co_filename
                if not any(c in caller for c in allowed_callers):
                    bad.append(f"Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
            elif where == "logging":
                logged.append(name)
            return real(self, *a, **k)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    data = corpus(conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    train(data, config, TrainConfig(epochs=1, batch_utterances=48, precision=precision, baseline=False),
          tmp_path, **quiet)
    monkeypatch.undo()
    assert not bad, bad[:5]
    assert logged, "the meters were never read at a logging point"


def test_a_non_finite_loss_is_caught_at_the_logging_point_and_the_last_good_epoch_kept(tmp_path, monkeypatch):
    data = corpus(conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=1, batch_utterances=48, baseline=False)
    train(data, config, tc, tmp_path, **quiet)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    real = CMATH.forward
    calls = {"n": 0}

    def diverging(self, batch, **kw):                # the loss of the 3rd step of epoch 2 is NaN
        out = real(self, batch, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(CMATH, "forward", diverging)
    with pytest.raises(FloatingPointError, match=r"non-finite.*epoch 2 \(steps \d+-\d+"):
        train(data, config, TrainConfig(epochs=2, batch_utterances=48, baseline=False), tmp_path, resume=True,
              **quiet)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------------------------------ precision

def test_bf16_autocast_learns_within_a_small_margin_of_fp32(tmp_path):
    data = make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=30, min_length=12, max_length=40,
                          seed=11)
    config = build_config(data, "iemocap", **SMALL)
    f1 = {}
    for precision in ("fp32", "bf16"):
        tc = TrainConfig(epochs=6, lr=3e-3, batch_utterances=64, seed=3, precision=precision, baseline=False)
        metrics = train(data, config, tc, tmp_path / precision, **quiet)
        f1[precision] = metrics["selected_by_validation"]["weighted_f1"]
        assert json.loads((tmp_path / precision / "train_config.json").read_text())["precision"] == precision
        weights = load_file(str(tmp_path / precision / "best.safetensors"))
        assert {v.dtype for k, v in weights.items() if v.is_floating_point()} == {torch.float32}  # fp32 master
    assert f1["fp32"] > 100 / data.num_classes + 30, f1          # it learns (84 when written)
    assert abs(f1["bf16"] - f1["fp32"]) < 5.0, f1


def test_fp16_grad_scaler_skips_steps_with_inf_gradients_without_touching_the_weights():
    data = corpus(conversations=8)
    config = build_config(data, "iemocap", **SMALL)
    torch.manual_seed(0)
    model = CMATH(config)
    optimizer = engine.make_optimizer(model, 1e-3, 0.01)
    precision = engine.Precision("fp16", "cpu")
    meter = engine.StepMeter("cpu")
    step = engine.Stepper(model, model, optimizer, precision, 1.0, meter)
    batch = data.batch(list(range(len(data))))
    for s in range(2):
        step([batch], 0, s)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    scale = precision.scaler.get_scale()
    hook = next(model.parameters()).register_hook(lambda g: g * float("inf"))
    step([batch], 0, 2)
    hook.remove()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())        # skipped
    assert all(torch.equal(moments[k], v) for k, v in optimizer.state[next(model.parameters())].items())
    assert precision.scaler.get_scale() == scale / 2
    seen = meter.read()
    assert seen["bad_grad"] == 1 and seen["bad_loss"] == 0 and seen["steps"] == 3
    step([batch], 0, 3)                                                                  # and it goes on
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert not all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_under_reduced_precision_equals_an_uninterrupted_run(tmp_path, precision):
    data = corpus(seed=5, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=2, batch_utterances=64, seed=5, precision=precision, baseline=False)
    full = train(data, config, tc, tmp_path / "full", **quiet)
    resumed = train_interrupted_after_epoch_1(data, config, tc, tmp_path / "cut")
    assert strip(resumed["history"]) == strip(full["history"])
    same_files(tmp_path / "full" / "last.safetensors", tmp_path / "cut" / "last.safetensors")
    # the run's precision is part of it: resuming with another one is refused
    from cmath_mer.errors import RunFolderError
    with pytest.raises(RunFolderError, match="precision"):
        train(data, config, TrainConfig(**{**tc.__dict__, "precision": "fp32", "epochs": 3}), tmp_path / "cut",
              resume=True, **quiet)


# ------------------------------------------------------------------------------ determinism, accumulation

def test_deterministic_runs_are_identical(tmp_path):
    data = corpus(seed=2, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=2, batch_utterances=64, seed=9, deterministic=True, accumulate=2, baseline=False)
    a = train(data, config, tc, tmp_path / "a", **quiet)
    b = train(data, config, tc, tmp_path / "b", **quiet)
    assert strip(a["history"]) == strip(b["history"])
    same_files(tmp_path / "a" / "best.safetensors", tmp_path / "b" / "best.safetensors")
    assert not torch.are_deterministic_algorithms_enabled()          # restored after the run


def test_micro_batches_split_by_utterances_without_cutting_a_conversation():
    lengths = [5, 9, 3, 7, 7, 2]
    group = [0, 1, 2, 3, 4, 5]
    for parts in range(1, 9):
        micro = engine.micro_batches(group, lengths, parts)
        assert [i for m in micro for i in m] == group
        assert len(micro) == min(parts, len(group)) and all(micro)
    assert engine.micro_batches([4], lengths, 4) == [[4]]


def test_accumulated_micro_batches_give_the_gradients_of_the_whole_batch():
    """Every loss term is a per-utterance mean, so micro-batch losses weighted by their share of the
    utterances sum to the batch's loss (without class weights, which normalise by the weights' sum)."""
    data = corpus(conversations=10)
    config = build_config(data, "iemocap", **{**SMALL, "dropout": 0.0}, variational_sample=False,
                          class_weights=False)
    grads = []
    for parts in (1, 3):
        torch.manual_seed(0)
        model = CMATH(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        step = engine.Stepper(model, model, optimizer, engine.Precision("fp32", "cpu"), 1e9, engine.StepMeter("cpu"))
        group = list(range(len(data)))
        step([data.batch(m) for m in engine.micro_batches(group, data.lengths(), parts)], 0, 0)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------ input pipeline

def _same_batch(a, b):
    assert a.features.keys() == b.features.keys()
    for m in a.features:
        assert torch.equal(a.features[m], b.features[m]), m
    assert torch.equal(a.speakers, b.speakers) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and a.conversation_ids == b.conversation_ids


def test_prefetcher_and_device_corpus_give_the_batches_of_the_plan_and_pass_errors_on(monkeypatch):
    data = corpus(conversations=12)
    mods = data.modalities
    groups = data.bucketed_batches(list(range(len(data))), 40, shuffle=True, seed=1)
    plan = [engine.micro_batches(g, data.lengths(), 2) for g in groups]
    cpu = torch.device("cpu")
    on_device = engine.DeviceCorpus(data, mods, cpu)       # the --data-on-device gather, here on the CPU
    for source in (None, on_device):
        with engine.Prefetcher(data, plan, mods, cpu, source) as feed:
            got = list(feed)
        assert len(got) == len(plan)
        for step, micro in zip(plan, got):
            assert len(step) == len(micro)
            for g, b in zip(step, micro):
                _same_batch(b, data.batch(g, mods))
    real = type(data).batch
    calls = {"n": 0}

    def failing(self, group, modalities=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("broken batch")
        return real(self, group, modalities)
    monkeypatch.setattr(type(data), "batch", failing)
    feed = engine.Prefetcher(data, plan, mods, cpu)
    with pytest.raises(RuntimeError, match="broken batch"), feed:
        for _ in feed:
            pass
    assert feed.thread is None                              # the thread was stopped and joined


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_stores_the_engine_settings_and_resume_keeps_them(tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    save_dataset(corpus(conversations=8), path)
    out = tmp_path / "run"
    small = json.dumps(SMALL)
    assert main(["train", "--data", str(path), "--epochs", "1", "--set", small, "--precision", "bf16",
                 "--accumulate", "2", "--deterministic", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["precision"], saved["accumulate"], saved["deterministic"], saved["compile"],
            saved["device"]) == ("bf16", 2, True, False, "cpu")             # auto: cpu on this machine
    capsys.readouterr()
    base = ["train", "--data", str(path), "--out", str(out), "--resume", "--no-progress"]
    for option, value in (("--precision", "fp32"), ("--accumulate", "1")):
        assert main(base + [option, value]) == 2
        err = capsys.readouterr().err
        assert option in err and "contradict" in err
    assert main(base + ["--epochs", "2", "--no-deterministic"]) == 0
    assert "--deterministic off" in capsys.readouterr().err
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["precision"], saved["accumulate"], saved["deterministic"], saved["epochs"]) == ("bf16", 2, False, 2)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "o"), "--accumulate", "0"]) == 2
    assert "--accumulate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compiled_training_follows_eager_training(tmp_path):
    """--compile (fullgraph, dynamic shapes): the same losses as eager within float tolerance (no dropout:
    inductor draws its own dropout masks; the variational eps is the same Philox stream), and the compile
    time is logged once. Minutes of compiling on a CPU: `-m slow`."""
    data = corpus(conversations=8)
    config = build_config(data, "iemocap", **{**SMALL, "dropout": 0.0})
    lines, loss = [], {}
    for compiled in (False, True):
        tc = TrainConfig(epochs=1, batch_utterances=64, compile=compiled, baseline=False)
        metrics = train(data, config, tc, tmp_path / str(compiled), progress=False, log=lines.append)
        loss[compiled] = metrics["history"][0]["train_loss"]
    assert sum("torch.compile: the first step took" in line for line in lines) == 1
    assert loss[True] == pytest.approx(loss[False], rel=1e-3), loss
