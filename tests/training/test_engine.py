"""The training engine, on the CPU: no host read inside a training step and none between steps but
the logging points' (a spy on Tensor.item and friends), bf16 autocast learns as well as fp32, fp16 with
GradScaler skips steps with inf gradients without touching the weights (and stops an epoch that skipped them
all), resume under bf16/fp16 equals an uninterrupted run (the loss scale included), --deterministic repeats a
run bit for bit, gradient accumulation gives the gradients of the whole batch, the default precision, and the
CLI stores and keeps the new settings, evaluate and predict in the run's precision."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

import cmath_mer.training.precision as precision_module
from cmath_mer.cli import main
from cmath_mer.data import make_synthetic, save_dataset
from cmath_mer.data.batching import split_by_utterances
from cmath_mer.model.cmath import CMATH
from cmath_mer.training import train as train_module
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.feed import DeviceCorpus, Prefetcher
from cmath_mer.training.meter import StepMeter, phase
from cmath_mer.training.precision import DTYPES, Precision, default_precision
from cmath_mer.training.prepare import build_config
from cmath_mer.training.step import Stepper, make_optimizer
from cmath_mer.training.train import resolve_train_config, train

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


def random_seed() -> int:
    return int(torch.randint(0, 10_000, ()))


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def nan_gradients(monkeypatch, when=lambda call: True):
    """Every CMATH built from now on gets a hook on its first parameter that makes that gradient NaN in the
    backward passes `when(call)` picks (call: 1, 2, ...); returns {"calls", "nan"}, the counts."""
    real = CMATH.__init__
    seen = {"calls": 0, "nan": 0}

    def hook(grad):
        seen["calls"] += 1
        if not when(seen["calls"]):
            return grad
        seen["nan"] += 1
        return grad * float("nan")

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        next(self.parameters()).register_hook(hook)
    monkeypatch.setattr(CMATH, "__init__", init)
    return seen


@contextlib.contextmanager
def training_linear_dtypes():
    """The set of (output dtype, weight dtype) of every nn.Linear called in training mode meanwhile."""
    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            seen.add((output.dtype, module.weight.dtype))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------- no host sync

HOST_READS = ("item", "cpu", "numpy", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_loop_reads_tensors_on_the_host_only_at_the_logging_points(tmp_path, monkeypatch, precision):
    """Every host read of a tensor in the training loop is recorded. Inside a step: torch's own AdamW reads
    its step counter, a host tensor by design (state_steps stay on the CPU unless capturable), and the
    reference attention's per-conversation loop reads cu_seqlens (the Triton path does not; the custom-op
    issue removes it from the reference under compile): those two callers are named and allowed, nothing
    else. Between the first step and the end of the epoch's loop (the training thread; the prefetcher's thread
    builds host batches): exactly the meter's one read (StepMeter.read: sums.tolist) at each logging point,
    every LOG_EVERY steps and at the epoch's last step, nothing else."""
    allowed_callers = ("torch/optim/", "kernels/attention/reference.py")
    monkeypatch.setattr(StepMeter, "LOG_EVERY", 3)
    bad, between, loop = [], [], {"open": False, "steps": 0}

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            where = phase()
            caller = sys._getframe(1)
            if where == "step":
                if not any(c in caller.f_code.co_filename for c in allowed_callers):
                    bad.append(f"Tensor.{name} from {caller.f_code.co_filename}:{caller.f_lineno}")
            elif loop["open"] and threading.current_thread() is threading.main_thread():
                between.append(f"{where}: Tensor.{name}")
            return real(self, *a, **k)
        return wrapper

    real_step, real_check = Stepper.__call__, train_module._check_finite_weights

    def step(self, *args, **kwargs):                 # the loop starts with the first step
        loop["open"] = True
        loop["steps"] += 1
        return real_step(self, *args, **kwargs)

    def loop_ended(*args, **kwargs):                 # the first thing after the epoch's loop
        loop["open"] = False
        return real_check(*args, **kwargs)
    monkeypatch.setattr(Stepper, "__call__", step)
    monkeypatch.setattr(train_module, "_check_finite_weights", loop_ended)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    data = corpus(conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    train(data, config, TrainConfig(epochs=1, batch_utterances=24, precision=precision, baseline=False),
          tmp_path, **quiet)
    monkeypatch.undo()
    assert not bad, bad[:5]
    steps = loop["steps"]
    assert steps > 3 and steps % 3, steps             # both kinds of logging point: every 3 steps, and the last
    assert between == ["logging: Tensor.tolist"] * (steps // 3 + 1), between


def test_a_non_finite_loss_is_caught_at_the_logging_point_and_the_last_good_epoch_kept(tmp_path, monkeypatch):
    data = corpus(conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=1, batch_utterances=48, baseline=False, keep_last=True)
    train(data, config, tc, tmp_path, **quiet)
    before = folder_bytes(tmp_path)
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
        train(data, config, TrainConfig(epochs=2, batch_utterances=48, baseline=False, keep_last=True), tmp_path,
              resume=True, **quiet)
    assert folder_bytes(tmp_path) == before


def test_an_fp16_epoch_that_skipped_every_step_stops_training_and_keeps_the_last_good_epoch(tmp_path, monkeypatch):
    """fp16: gradients NaN at every loss scale (a hook) make the scaler skip every step of epoch 2, halving
    the scale at each down below 1 (it starts at 2 here); training stops naming the epoch, its steps and the
    last scale tried, and the run folder keeps epoch 1 byte for byte."""
    monkeypatch.setattr(precision_module, "FP16_INIT_SCALE", 2.0)
    seed = random_seed()
    data = corpus(seed=seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=1, batch_utterances=32, seed=seed, precision="fp16", baseline=False, keep_last=True)
    train(data, config, tc, tmp_path, **quiet)
    before = folder_bytes(tmp_path)
    state = read_metadata(tmp_path / "last.safetensors")["state"]
    n = state["global_step"]                                   # steps per epoch
    last_scale = re.escape(f"{state['scaler']['scale'] * 0.5**n:g}")    # halved at each skipped step
    nan_gradients(monkeypatch)
    with pytest.raises(FloatingPointError, match=rf"every step of epoch 2 \(steps {n + 1}-{2 * n},.* was skipped: "
                       rf"the gradients were inf/NaN at every loss scale tried, down to {last_scale};.*keep the "
                       rf"last good epoch"):
        train(data, config, dataclasses.replace(tc, epochs=2), tmp_path, resume=True, **quiet)
    assert folder_bytes(tmp_path) == before


def test_an_fp16_epoch_skipped_whole_above_scale_1_warns_and_training_goes_on(tmp_path, monkeypatch):
    """A short fp16 epoch can skip every step while the scaler comes down from 2**16 (a small corpus): with the
    scale still >= 1 that is a warning naming the epoch, not the end of the run."""
    seed = random_seed()
    data = corpus(seed=seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=2, batch_utterances=32, seed=seed, precision="fp16", baseline=False, keep_last=True)
    seen = nan_gradients(monkeypatch, when=lambda call: call <= 2)     # epoch 1 has more than 2 steps
    lines = []
    metrics = train(data, config, tc, tmp_path, progress=False, log=lines.append)
    skipped = [row["skipped_steps"] for row in metrics["history"]]
    assert skipped == [2, 0] and seen["nan"] == 2, (skipped, seen)
    assert not [line for line in lines if "warning: every step" in line], lines          # 2 of more: no warning
    nan_gradients(monkeypatch)                                          # now every step of epoch 3
    lines.clear()
    metrics = train(data, config, dataclasses.replace(tc, epochs=3), tmp_path, resume=True, progress=False,
                    log=lines.append)
    assert len(metrics["history"]) == 3 and metrics["history"][2]["skipped_steps"] > 0
    assert [line for line in lines if line.startswith("warning: every step of epoch 3 (steps ")], lines


def test_fp16_steps_skipped_now_and_then_are_no_error(tmp_path, monkeypatch):
    """fp16: NaN gradients at every other step. The scaler skips those steps, the others train, the run
    finishes, and the history counts the skipped steps."""
    seed = random_seed()
    data = corpus(seed=seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    seen = nan_gradients(monkeypatch, when=lambda call: call % 2 == 1)
    metrics = train(data, config, TrainConfig(epochs=2, batch_utterances=32, seed=seed, precision="fp16",
                                              baseline=False), tmp_path, **quiet)
    skipped = [row["skipped_steps"] for row in metrics["history"]]
    assert len(skipped) == 2 and all(s > 0 for s in skipped), skipped
    assert sum(skipped) == seen["nan"] == (seen["calls"] + 1) // 2, (skipped, seen)


# ------------------------------------------------------------------------------------------ precision

def test_bf16_autocast_learns_within_a_small_margin_of_fp32(tmp_path):
    data = make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=30, min_length=12, max_length=40,
                          seed=11)
    config = build_config(data, "iemocap", **SMALL)
    f1 = {}
    for precision in ("fp32", "bf16"):
        tc = TrainConfig(epochs=6, lr=3e-3, batch_utterances=64, seed=3, precision=precision, baseline=False)
        with training_linear_dtypes() as linear:
            metrics = train(data, config, tc, tmp_path / precision, **quiet)
        # the training forward's Linear layers compute in the autocast dtype, on fp32 weights
        assert linear == {(DTYPES[precision], torch.float32)}, (precision, linear)
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
    optimizer = make_optimizer(model, 1e-3, 0.01)
    precision = Precision("fp16", "cpu")
    meter = StepMeter("cpu")
    step = Stepper(model, model, optimizer, precision, 1.0, meter)
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
def test_resume_under_reduced_precision_equals_an_uninterrupted_run(tmp_path, monkeypatch, precision):
    """Losses, skipped steps, weights and optimizer state of a run interrupted after epoch 1 and resumed equal
    those of the uninterrupted run. fp16 starts at a loss scale of 2**19, so the first steps overflow and are
    skipped, halving the scale: the resumed epoch 2 skips what the uninterrupted one skips only if the
    checkpoint kept the scale."""
    monkeypatch.setattr(precision_module, "FP16_INIT_SCALE", 2.0**19)
    seed = random_seed()
    data = corpus(seed=seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=2, batch_utterances=32, seed=seed, precision=precision, baseline=False, keep_last=True)
    full = train(data, config, tc, tmp_path / "full", **quiet)
    if precision == "fp16":
        skipped = [row["skipped_steps"] for row in full["history"]]
        assert skipped[0] > 0, skipped                               # the scale moved before the interruption
    resumed = train_interrupted_after_epoch_1(data, config, tc, tmp_path / "cut")
    assert strip(resumed["history"]) == strip(full["history"])
    same_files(tmp_path / "full" / "last.safetensors", tmp_path / "cut" / "last.safetensors")
    scaler = [read_metadata(tmp_path / run / "last.safetensors")["state"].get("scaler") for run in ("full", "cut")]
    assert scaler[0] == scaler[1] and (scaler[0] is not None) == (precision == "fp16"), scaler
    # the run's precision is part of it: resuming with another one is refused
    from cmath_mer.errors import RunFolderError
    with pytest.raises(RunFolderError, match="precision"):
        train(data, config, TrainConfig(**{**tc.__dict__, "precision": "fp32", "epochs": 3}), tmp_path / "cut",
              resume=True, **quiet)


# ------------------------------------------------------------------------------ determinism, accumulation

def test_deterministic_runs_are_identical(tmp_path, monkeypatch):
    """Two --deterministic runs give the same history and weights; torch's deterministic algorithms are on in
    every training step of such a run, off in a run without it, and off again after the run."""
    seed = random_seed()
    data = corpus(seed=seed, conversations=16)
    config = build_config(data, "iemocap", **SMALL)
    tc = TrainConfig(epochs=2, batch_utterances=64, seed=seed, deterministic=True, accumulate=2, baseline=False)
    real = Stepper.__call__
    in_steps = []

    def step(self, *args, **kwargs):
        in_steps.append(torch.are_deterministic_algorithms_enabled())
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Stepper, "__call__", step)
    a = train(data, config, tc, tmp_path / "a", **quiet)
    b = train(data, config, tc, tmp_path / "b", **quiet)
    assert in_steps and all(in_steps)
    assert not torch.are_deterministic_algorithms_enabled()          # restored after the run
    assert strip(a["history"]) == strip(b["history"])
    same_files(tmp_path / "a" / "best.safetensors", tmp_path / "b" / "best.safetensors")
    in_steps.clear()
    train(data, config, dataclasses.replace(tc, deterministic=False, epochs=1), tmp_path / "c", **quiet)
    assert in_steps and not any(in_steps)


def test_micro_batches_split_by_utterances_without_cutting_a_conversation():
    lengths = [5, 9, 3, 7, 7, 2]
    group = [0, 1, 2, 3, 4, 5]
    for parts in range(1, 9):
        micro = split_by_utterances(group, lengths, parts)
        assert [i for m in micro for i in m] == group
        assert len(micro) == min(parts, len(group)) and all(micro)
    assert split_by_utterances([4], lengths, 4) == [[4]]


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
        step = Stepper(model, model, optimizer, Precision("fp32", "cpu"), 1e9, StepMeter("cpu"))
        group = list(range(len(data)))
        step([data.batch(m) for m in split_by_utterances(group, data.lengths(), parts)], 0, 0)
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
    plan = [split_by_utterances(g, data.lengths(), 2) for g in groups]
    cpu = torch.device("cpu")
    on_device = DeviceCorpus(data, mods, cpu)       # the --data-on-device gather, here on the CPU
    for source in (None, on_device):
        with Prefetcher(data, plan, mods, cpu, source) as feed:
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
    feed = Prefetcher(data, plan, mods, cpu)
    with pytest.raises(RuntimeError, match="broken batch"), feed:
        for _ in feed:
            pass
    assert feed.thread is None                              # the thread was stopped and joined


# ------------------------------------------------------------------------------------------ default precision

def test_the_default_precision_is_fp32_on_the_cpu_and_bf16_on_cuda_cards_with_native_bfloat16(monkeypatch):
    """Without a GPU: torch.cuda's answers are stubbed. A card with native bfloat16 gets bf16, one that has it
    only emulated (torch says yes only when emulation counts) gets fp32, and so does the CPU; a precision that
    was given is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision("cpu") == "fp32"
    assert resolve_train_config(TrainConfig()).precision == "fp32"                    # auto: the CPU here
    assert resolve_train_config(TrainConfig(precision="bf16")).precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native, emulated, expected in ((True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native or (including_emulation and emulated))
        assert default_precision("cuda") == expected
        assert default_precision("cuda:0") == expected
        tc = resolve_train_config(TrainConfig())
        assert (tc.device, tc.precision) == ("cuda", expected)
        assert resolve_train_config(TrainConfig(precision="fp16")).precision == "fp16"


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_stores_the_engine_settings_and_resume_keeps_them(tmp_path, capsys):
    path = tmp_path / "d.safetensors"
    save_dataset(corpus(conversations=8), path)
    out = tmp_path / "run"
    small = json.dumps(SMALL)
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", "1", "--set", small, "--precision", "bf16",
                 "--accumulate", "2", "--deterministic", "--out", str(out), "--no-progress", "--keep-last"]) == 0
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
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--out", str(tmp_path / "o"), "--accumulate", "0"]) == 2
    assert "--accumulate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_and_predict_run_in_the_runs_precision_unless_told(tmp_path, monkeypatch, capsys):
    """A bf16 run: evaluate reproduces the test metrics of metrics.json for the selected epoch, and evaluate and
    predict run the forward under bf16 autocast by default, without autocast under --precision fp32 (a spy
    on the model's forward records the autocast state)."""
    path = tmp_path / "d.safetensors"
    save_dataset(corpus(seed=random_seed(), conversations=12), path)
    out = tmp_path / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", "2", "--set", json.dumps(SMALL), "--precision", "bf16",
                 "--out", str(out), "--no-progress"]) == 0
    selected = json.loads((out / "metrics.json").read_text())["selected_by_validation"]
    capsys.readouterr()
    real = CMATH.forward
    autocast = []

    def forward(self, *args, **kwargs):
        autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(CMATH, "forward", forward)
    for option, dtype in (([], torch.bfloat16), (["--precision", "fp32"], None)):
        autocast.clear()
        assert main(["evaluate", "--checkpoint", str(out), "--data", str(path), *option]) == 0
        assert autocast and set(autocast) == {dtype}, (option, autocast)
        if not option:
            evaluated = json.loads(capsys.readouterr().out)
            assert {k: evaluated[k] for k in ("weighted_f1", "accuracy", "per_class_f1")} == \
                {k: selected[k] for k in ("weighted_f1", "accuracy", "per_class_f1")}
        autocast.clear()
        assert main(["predict", "--checkpoint", str(out), "--data", str(path), "--out", str(tmp_path / "p.csv"),
                     *option]) == 0
        assert autocast and set(autocast) == {dtype}, (option, autocast)
        capsys.readouterr()


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
