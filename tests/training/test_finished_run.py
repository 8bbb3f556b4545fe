"""What a finished run leaves: best.safetensors with the weights evaluation uses and nothing to train on, no
last.safetensors unless --keep-last (then --resume --epochs extends the run), and no lock file; a finished
run without last is refused, in one line, when asked to train on."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cmath_mer.training.run_folder as run_folder
from cmath_mer.cli import main
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.evaluate import load_trained
from cmath_mer.training.run_folder import LOCK_NAME, RunLock

TINY = json.dumps({"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16})


def train_argv(corpus, out, *extra, epochs=2):
    return ["train", "--data", str(corpus), "--epochs", str(epochs), "--set", TINY, "--out", str(out),
            "--no-progress", "--preset", "iemocap", *extra]


def test_a_finished_run_keeps_the_evaluated_weights_only_and_no_lock(tmp_path, corpus):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "last.safetensors" not in names and LOCK_NAME not in names, names
    best = load_file(out / "best.safetensors")
    assert all(k.startswith("model.") for k in best), sorted(best)[:5]          # no optimizer state, no average
    assert read_metadata(out / "best.safetensors")["param_groups"] is None
    model = load_trained(out)                       # evaluation reads exactly these weights
    own = model.state_dict()
    assert best.keys() == {f"model.{k}" for k in own}
    for k, v in own.items():
        assert torch.equal(v.cpu(), best[f"model.{k}"]), k
    # the file is the weights and its metadata, nothing more: within 64 KiB of the tensors' bytes
    weights = sum(v.numel() * v.element_size() for v in best.values())
    assert weights <= (out / "best.safetensors").stat().st_size <= weights + 64 * 1024


def test_keep_last_lets_resume_extend_a_finished_run(tmp_path, corpus, capsys):
    out = tmp_path / "kept"
    assert main(train_argv(corpus, out, "--keep-last", epochs=1)) == 0
    last = load_file(out / "last.safetensors")
    assert any(k.startswith("optim.") for k in last)
    assert not (out / LOCK_NAME).exists()
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                 "--no-progress"]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert (out / "last.safetensors").exists()            # the run's own --keep-last, kept by the resume


def test_a_finished_run_without_last_is_refused_in_one_line_when_extended(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, epochs=1)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("cmath-mer: error: --resume") and str(out) in err and "--keep-last" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before          # nothing written
    # asking for no more epochs than it has is no training at all: it succeeds and changes nothing that matters
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == json.loads(before["metrics.json"])


def test_the_lock_file_goes_with_its_holder_even_after_an_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with RunLock(out):
            assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
            raise RuntimeError("training failed")
    assert not (out / LOCK_NAME).exists()
    with RunLock(out):                              # and the next writer takes the folder
        assert (out / LOCK_NAME).exists()


def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again(tmp_path, monkeypatch):
    """The race the removal opens: B opens the lock file, A removes it and unlocks, B's flock succeeds on the
    removed file. B must see that the name is gone and lock the file now at that name."""
    out = tmp_path / "run"
    out.mkdir()
    real_flock, calls = run_folder.fcntl.flock, []

    def flock(fd, op):
        calls.append(op)
        if len(calls) == 1:                         # A's exit happens between B's open and B's flock
            (out / LOCK_NAME).unlink()
        return real_flock(fd, op)
    monkeypatch.setattr(run_folder.fcntl, "flock", flock)
    with RunLock(out) as lock:
        st, own = os.stat(out / LOCK_NAME), os.fstat(lock.fd)
        assert (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
        assert len([op for op in calls if op & run_folder.fcntl.LOCK_EX]) == 2
    assert not Path(out / LOCK_NAME).exists()
