"""Nothing a user does loses data or leaves a run unusable. One test per data-loss defect (run
folders, non-finite weights, predict's output, resume, kill leftovers), the silent-acceptance cases, and a
table of CLI misuse cases (exit code, one-line message naming the option or file, no traceback, nothing
written). The kill -9 test is in test_kill.py."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmath_mer.cli import main
from cmath_mer.data import DataError, load_dataset, make_synthetic, save_dataset, write_peer_pickle
from cmath_mer.errors import ConfigError, RunFolderError
from cmath_mer.model.config import CMATHConfig
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.evaluate import load_trained
from cmath_mer.training.prepare import build_config
from cmath_mer.training.run_folder import LOCK_NAME, RunLock
from cmath_mer.training.train import train

from helpers import refused

REPO = Path(__file__).resolve().parents[2]
DIMS = {"text": 12, "audio": 10, "visual": 6}
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16}
TINY_SET = json.dumps(TINY)


def tiny_corpus(seed: int = 0, conversations: int = 10, **kw):
    return make_synthetic(None, input_dims=DIMS, num_classes=4, conversations=conversations, min_length=3,
                          max_length=10, seed=seed, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.safetensors"
    save_dataset(tiny_corpus(), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A finished 1-epoch run folder that kept last.safetensors, so --resume can extend it (copy it before
    changing it)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out),
                 "--no-progress", "--keep-last"]) == 0
    return out


def run_copy(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under folder (what a refused command must leave as it was)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ 1. run folders overwritten

def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys, trained, corpus):
    out = run_copy(trained, tmp_path)
    before = snapshot(out)
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out)], 2,
            str(out), "--resume", "--overwrite")
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--epochs", "-1", "--out", str(out)], 2, "--epochs")
    assert snapshot(out) == before
    # --overwrite clears the old run first: the new config, and no file of the old run left
    other = json.dumps({**TINY, "d_model": 8})
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--epochs", "1", "--set", other, "--out", str(out),
                 "--overwrite", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["d_model"] == 8
    assert read_metadata(out / "best.safetensors")["config"]["d_model"] == 8
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(corpus)]) == 0
    # a folder holding something else is no run folder, even with --overwrite
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--out", str(tmp_path / "mine"), "--overwrite"], 2,
            "notes.txt")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_second_writer_is_stopped_by_the_lock(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    with RunLock(out):                   # another process holds the folder (flock: per open file, so also here)
        refused(capsys, ["train", "--preset", "iemocap",
                         "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out)], 1,
                str(out), "another process")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out),
                 "--no-progress"]) == 0


def test_nothing_but_the_checkpoint_makes_a_run_and_config_json_comes_with_it(tmp_path, corpus):
    """The config is written after the first checkpoint: killed before it, the folder is empty or the
    checkpoint alone (config in its metadata) is loadable."""
    import cmath_mer.training.train as train_module
    data = load_dataset(corpus)
    config = build_config(data, "iemocap", **TINY)
    out = tmp_path / "run"
    seen = []
    save = train_module.save_checkpoint

    def spy(path, *a, **k):
        seen.append(sorted(p.name for p in out.iterdir()))
        return save(path, *a, **k)
    train_module.save_checkpoint = spy
    try:
        train(data, config, TrainConfig(epochs=1, keep_last=True), out, progress=False, log=lambda *_: None)
    finally:
        train_module.save_checkpoint = save
    assert seen[0] == [LOCK_NAME]                    # nothing before the first checkpoint
    from cmath_mer.training.run_folder import RUN_FILES
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)          # and no lock left
    for name in ("config.json", "train_config.json", "best.safetensors", "metrics.json", "confusion_matrix.png",
                 "training_curves.png"):
        (out / name).unlink()                       # as if killed right after last.safetensors was renamed
    metrics = train(data, config, TrainConfig(epochs=2), out, resume=True, progress=False, log=lambda *_: None)
    assert [r["epoch"] for r in metrics["history"]] == [1, 2]
    assert load_trained(out).config == config


# --------------------------------------------------------------------------- 2. non-finite weights saved

def test_non_finite_weights_are_never_saved_and_never_used(tmp_path, capsys, corpus, monkeypatch):
    data = load_dataset(corpus)
    config = build_config(data, "iemocap", **TINY)
    out = tmp_path / "run"
    train(data, config, TrainConfig(epochs=1, keep_last=True), out, progress=False, log=lambda *_: None)
    good = snapshot(out)
    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):                     # an update that makes the weights NaN (as --lr inf did)
        result = step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite"):
        train(data, config, TrainConfig(epochs=2), out, resume=True, progress=False, log=lambda *_: None)
    monkeypatch.undo()
    assert snapshot(out) == good                     # best and last still epoch 1
    # a checkpoint that holds NaN weights (from elsewhere) is refused by evaluate and predict
    tensors = load_file(str(out / "best.safetensors"))
    with safe_open(str(out / "best.safetensors"), framework="pt") as f:       # without hashes: an older file
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    key = next(k for k in tensors if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[key][0] = float("nan")
    save_file(tensors, str(out / "best.safetensors"), metadata=meta)
    refused(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1, "best.safetensors",
            "non-finite")
    refused(capsys, ["predict", "--checkpoint", str(out), "--data", str(corpus), "--out",
                     str(tmp_path / "p.csv")], 1, "non-finite")
    assert not (tmp_path / "p.csv").exists()
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--lr", "inf", "--out", str(tmp_path / "x")], 2, "--lr")


# ------------------------------------------------------------------------------ 3. predict destroys input

def test_predict_refuses_an_input_as_output_and_writes_atomically(tmp_path, capsys, trained, corpus):
    data = tmp_path / "d.safetensors"
    shutil.copy(corpus, data)
    before = data.read_bytes()
    refused(capsys, ["predict", "--checkpoint", str(trained), "--data", str(data), "--out", str(data)], 2,
            "--out", "input")
    refused(capsys, ["predict", "--checkpoint", str(trained), "--data", str(data), "--out",
                     str(trained / "best.safetensors")], 2, "--out")
    assert data.read_bytes() == before
    assert main(["predict", "--checkpoint", str(trained), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_loaded_corpus_survives_its_file_being_rewritten(tmp_path, corpus):
    """The data is in memory once loaded: truncating the file (as a writer does) cannot crash a reader
    (memory-mapped tensors died with SIGBUS)."""
    path = tmp_path / "d.safetensors"
    shutil.copy(corpus, path)
    code = ("import os, sys, torch\nfrom cmath_mer.data import load_dataset\n"
            f"d = load_dataset({str(path)!r})\nos.truncate({str(path)!r}, 0)\n"
            "print(float(sum(x.sum() for x in d.features.values())), int(d.labels.sum()))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------------ 4. resume

def test_resume_refuses_contradicting_options_and_other_data_writing_nothing(tmp_path, capsys, trained, corpus):
    out = run_copy(trained, tmp_path)
    before = snapshot(out)
    base = ["train", "--data", str(corpus), "--out", str(out), "--resume", "--no-progress"]
    refused(capsys, base + ["--lr", "0.5"], 2, "--lr 0.5")
    refused(capsys, base + ["--set", '{"d_model": 64}'], 2, "d_model")
    refused(capsys, base + ["--modalities", "text"], 2, "--modalities")
    refused(capsys, base + ["--seed", "7"], 2, "--seed")
    refused(capsys, base + ["--preset", "meld"], 2, "--preset")
    refused(capsys, base + ["--backend", "torch"], 2, "--backend")
    refused(capsys, base + ["--precision", "bf16"], 2, "--precision bf16")
    refused(capsys, base + ["--accumulate", "3"], 2, "--accumulate 3")
    refused(capsys, base + ["--overwrite"], 2, "--overwrite")
    for i, other in enumerate([tiny_corpus(seed=5), tiny_corpus(conversations=6)]):     # other / smaller data
        path = tmp_path / f"other{i}.safetensors"
        save_dataset(other, path)
        refused(capsys, ["train", "--data", str(path), "--out", str(out), "--resume", "--epochs", "2"], 1,
                "data differ", str(path))
    assert snapshot(out) == before
    # options equal to the run's are no contradiction; --epochs extends it and says so
    assert main(base + ["--set", TINY_SET, "--seed", "0", "--lr", "0.001", "--epochs", "2"]) == 0
    assert "training to 2 epochs" in capsys.readouterr().err
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]
    assert json.loads((out / "train_config.json").read_text())["epochs"] == 2


def test_resume_api_refuses_another_config(tmp_path, trained, corpus):
    data = load_dataset(corpus)
    out = run_copy(trained, tmp_path)
    config = build_config(data, "iemocap", **{**TINY, "g_kd": 0.9})
    with pytest.raises(RunFolderError, match="g_kd"):
        train(data, config, TrainConfig(epochs=2), out, resume=True, progress=False, log=lambda *_: None)


# ------------------------------------------------------------------------------------ 5. kill leftovers

def test_stale_temporaries_are_cleaned_and_resume_works_from_last_alone(tmp_path, trained, corpus, capsys):
    out = run_copy(trained, tmp_path)
    for name in (".best.safetensors.abc123.tmp", ".confusion_matrix.png.x.tmp", ".metrics.json.y.tmp"):
        (out / name).write_bytes(b"\0" * 100)
    (out / "best.safetensors").unlink()              # a kill during epoch 1 between last and best
    (out / "confusion_matrix.png").write_bytes(b"")  # and the old torn picture
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                 "--no-progress"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert (out / "best.safetensors").exists() and (out / "confusion_matrix.png").stat().st_size > 0
    assert [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]


def test_files_get_the_usual_permissions(tmp_path, trained, corpus):
    old = os.umask(0o022)
    try:
        path = tmp_path / "s.safetensors"
        assert main(["synth", str(path), "--conversations", "2", "--min-length", "2", "--max-length", "3"]) == 0
        out = tmp_path / "run"
        data = load_dataset(corpus)
        train(data, build_config(data, "iemocap", **TINY), TrainConfig(epochs=1, keep_last=True), out,
              progress=False, log=lambda *_: None)
    finally:
        os.umask(old)
    for p in (path, out / "best.safetensors", out / "last.safetensors", out / "config.json"):
        assert p.stat().st_mode & 0o777 == 0o644, p


# -------------------------------------------------------------------------------- silent acceptance

def test_speakers_are_renumbered_and_bounded(tmp_path):
    data = tiny_corpus(conversations=4)
    pkl = tmp_path / "big.pkl"
    write_peer_pickle(data, pkl, "12", speaker_style="index")
    obj = list(pickle.loads(pkl.read_bytes()))
    obj[1] = {k: [v * 3_000_000 for v in vs] for k, vs in obj[1].items()}     # speakers 0 and 3,000,000
    pkl.write_bytes(pickle.dumps(tuple(obj)))
    back = load_dataset(pkl)
    assert back.num_speakers == 2 and back.speaker_names == ("speaker0", "speaker3000000")
    assert torch.equal(back.speakers, data.speakers)
    path = tmp_path / "huge.safetensors"
    save_dataset(tiny_corpus(conversations=2), path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["cmath_mer"])
    for value, words in ((2 ** 40, "65536"), ("abc", "integer")):
        inner["num_speakers"] = value
        save_file(tensors, str(path), metadata={**meta, "cmath_mer": json.dumps(inner)})
        with pytest.raises(DataError, match=words):
            load_dataset(path)


def test_class_names_must_match_by_name(tmp_path, capsys, trained):
    other = tiny_corpus(class_names=("a", "b", "c", "d"))
    path = tmp_path / "abcd.safetensors"
    save_dataset(other, path)
    for cmd in (["evaluate"], ["predict", "--out", str(tmp_path / "p.csv")]):
        refused(capsys, cmd + ["--checkpoint", str(trained), "--data", str(path)], 1, "abcd.safetensors",
                "a, b, c, d")


def test_an_edited_config_json_is_refused(tmp_path, capsys, trained, corpus):
    out = run_copy(trained, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_heads": 1}))
    refused(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1, "config.json", "n_heads")
    (out / "config.json").write_text(json.dumps({**config, "bogus": 1}))
    refused(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1, "config.json", "bogus")
    (out / "config.json").write_text("[1, 2]")
    refused(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1, "config.json", "object")


def test_pickle_bombs_are_refused_before_any_work(tmp_path):
    nested = []
    for _ in range(30):
        nested = [nested, nested]                    # 2^30 elements once walked, a few hundred bytes
    selfref = []
    selfref.append(selfref)
    deep = []
    for _ in range(200):
        deep = [deep]
    for name, obj, words in (("doubling", nested, "elements"), ("self", selfref, "holds itself"),
                             ("deep", deep, "deep")):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=4))
        t0 = time.perf_counter()
        with pytest.raises(DataError, match=words):
            load_dataset(path)
        assert time.perf_counter() - t0 < 2.0


def test_pickled_calls_cannot_ask_for_huge_allocations(tmp_path):
    for payload in (b"\x80\x04cbuiltins\nbytes\nJ\x00\x00\x00\x7f\x85R.",                 # bytes(2**31 - ...)
                    b"\x80\x04cbuiltins\nlist\ncbuiltins\nrange\nJ\x00\x00\x00\x7f\x85R\x85R."):
        path = tmp_path / "big.pkl"
        path.write_bytes(payload)
        with pytest.raises(DataError, match="refused"):
            load_dataset(path)


def test_bad_data_values_are_errors(tmp_path):
    data = tiny_corpus(conversations=3)
    # integer features in a pickle
    pkl = tmp_path / "int.pkl"
    write_peer_pickle(data, pkl, "12")
    obj = pickle.loads(pkl.read_bytes())
    obj = list(obj)
    obj[7] = {k: [np.round(v).astype(np.int64) for v in vs] for k, vs in obj[7].items()}
    pkl.write_bytes(pickle.dumps(tuple(obj)))
    with pytest.raises(DataError, match="int64"):
        load_dataset(pkl)
    # bool labels in a pickle
    obj = list(pickle.loads((tmp_path / "int.pkl").read_bytes()))
    write_peer_pickle(data, pkl, "12")
    obj = list(pickle.loads(pkl.read_bytes()))
    obj[2] = {k: [bool(v % 2) for v in vs] for k, vs in obj[2].items()}
    pkl.write_bytes(pickle.dumps(tuple(obj)))
    with pytest.raises(DataError, match="labels"):
        load_dataset(pkl)
    # safetensors: string name lists, integer features, float/2-D splits, a flipped bit
    path = tmp_path / "d.safetensors"
    save_dataset(data, path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["cmath_mer"])
    cases = [({"conversation_ids": "abc"}, {}, "conversation_ids"), ({"class_names": "abcd"}, {}, "class_names"),
             ({}, {"features.text": tensors["features.text"].to(torch.int32)}, "features.text"),
             ({}, {"splits": tensors["splits"].float()}, "splits"),
             ({}, {"splits": tensors["splits"][None]}, "splits")]
    for meta_change, tensor_change, words in cases:
        bad = tmp_path / "bad.safetensors"
        m = {**meta, "cmath_mer": json.dumps({**inner, **meta_change, "sha256": None})}
        save_file({**tensors, **tensor_change}, str(bad), metadata=m)
        with pytest.raises(DataError, match=words):
            load_dataset(bad)
    flipped = {**tensors, "cu_seqlens": tensors["cu_seqlens"].clone()}
    flipped["cu_seqlens"][1] += 1
    save_file(flipped, str(path), metadata=meta)
    with pytest.raises(DataError, match="checksum"):
        load_dataset(path)


@pytest.mark.parametrize("bad, words", [
    ({"window": "abc"}, "window"), ({"window": -1}, "window"), ({"n_heads": 0}, "n_heads"),
    ({"d_model": -8}, "d_model"), ({"central_modalities": []}, "central_modalities"), ({"tau": 0}, "tau"),
    ({"num_speakers": "abc"}, "num_speakers"), ({"class_names": "hapsad", "num_classes": 6}, "class_names"),
    ({"dropout": 1.5}, "dropout"), ({"class_weights": "yes"}, "class_weights")])
def test_config_values_are_checked(bad, words):
    with pytest.raises(ConfigError, match=words):
        CMATHConfig(**bad)


# ---------------------------------------------------------------------------------- CLI misuse table

TRAIN = ["train", "--preset", "iemocap"]          # the test corpus's classes are no preset's
MISUSE = [
    # (argv after the subcommand, with {data} {run} {tmp} {pkl}), exit code, words the message must hold
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--epochs", "0"], 2, ["--epochs"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--lr", "0"], 2, ["--lr"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--modalities", ""], 2, ["--modalities"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--modalities", "text,text"], 2, ["--modalities", "twice"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--modalities", "smell"], 2, ["--modalities", "smell"]),
    ([*TRAIN, "--data", "{pkl}", "--out", "{tmp}/o", "--class-names", ""], 2, ["--class-names"]),
    ([*TRAIN, "--data", "{data}", "--out", ""], 2, ["--out"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"bogus": 1}'], 2, ["--set", "bogus"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", "[1, 2]"], 2, ["--set", "object"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", "{nope"], 2, ["--set", "JSON"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"num_classes": 3}'], 2, ["--set", "num_classes"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"modalities": ["text"]}'], 2, ["--modalities"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"window": "abc"}'], 2, ["window"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"n_heads": 0}'], 2, ["n_heads"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"d_model": -8}'], 2, ["d_model"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"central_modalities": []}'], 2,
     ["central_modalities"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"tau": 0}'], 2, ["tau"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--device", "cuda"], 2, ["--device"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--device", "foo"], 2, ["--device", "foo"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--backend", "triton"], 2, ["--backend triton"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"backend": "triton"}'], 2, ["triton"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--set", '{"backend": "cuda"}'], 2, ["backend"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--class-names", "a,b,c,d"], 2,
     ["--class-names", "safetensors"]),
    ([*TRAIN, "--data", "{data}", "--out", "{data}"], 2, ["--out", "file"]),
    ([*TRAIN, "--data", "{tmp}/missing.safetensors", "--out", "{tmp}/o"], 1, ["missing.safetensors"]),
    ([*TRAIN, "--data", "{unlabelled}", "--out", "{tmp}/o", "--epochs", "1"], 1, ["unlabelled", "labels"]),
    (["train", "--data", "{data}", "--out", "{tmp}/nothing", "--resume"], 2, ["nothing to resume"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--seeds", "1,1"], 2, ["--seeds"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--seeds", "0,1", "--seed", "3"], 2, ["--seeds"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--patience", "0"], 2, ["--patience"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--accumulate", "0"], 2, ["--accumulate"]),
    ([*TRAIN, "--data", "{data}", "--out", "{tmp}/o", "--device", "cuda:1", "--precision", "bf16"], 2, ["--device"]),
    ([*TRAIN, "--data", "{data}", "--out", "{data}/run", "--epochs", "1"], 1, ["--out", "Not a directory"]),
    (["evaluate", "--checkpoint", "{tmp}/norun", "--data", "{data}"], 1, ["norun"]),
    (["evaluate", "--checkpoint", "{empty_ckpt}", "--data", "{data}"], 1, ["best.safetensors"]),
    (["evaluate", "--checkpoint", "{torn_ckpt}", "--data", "{data}"], 1, ["best.safetensors"]),
    (["evaluate", "--checkpoint", "{run}", "--data", "{unlabelled}"], 1, ["labelled"]),
    (["evaluate", "--checkpoint", "{run}", "--data", "{data}", "--device", "cuda:0"], 2, ["--device"]),
    (["predict", "--checkpoint", "{run}", "--data", "{data}", "--out", "{tmp}"], 2, ["--out", "folder"]),
    (["predict", "--checkpoint", "{run}", "--data", "{data}", "--out", "{tmp}/no/such/p.csv"], 2, ["--out"]),
    (["convert", "{pkl}", "{pkl}"], 2, ["output", "input"]),
    (["convert", "{pkl}", "{tmp}"], 2, ["output", "folder"]),
    (["convert", "{data}", "{tmp}/c.safetensors", "--class-names", "a,b"], 2, ["--class-names"]),
    (["synth", "{tmp}/s.safetensors", "--conversations", "0"], 2, ["--conversations"]),
    (["baseline", "--data", "{data}", "--modalities", ""], 2, ["--modalities"]),
    (["featurize", "{tmp}/t.csv", "--out", "{tmp}/t.csv"], 2, ["--out", "input"]),
    (["featurize", "{tmp}/t.csv", "--out", "{tmp}/f.safetensors", "--class-names", ""], 2, ["--class-names"]),
]


@pytest.fixture(scope="module")
def misuse_inputs(tmp_path_factory, corpus, trained) -> dict:
    root = tmp_path_factory.mktemp("misuse")
    pkl = root / "in.pkl"
    write_peer_pickle(tiny_corpus(conversations=4), pkl, "12")
    unlabelled = tiny_corpus(conversations=4)
    unlabelled.labels = torch.full_like(unlabelled.labels, -100)
    save_dataset(unlabelled, root / "unlabelled.safetensors")
    empty, torn = root / "empty_ckpt", root / "torn_ckpt"
    shutil.copytree(trained, empty)
    shutil.copytree(trained, torn)
    (empty / "best.safetensors").write_bytes(b"")
    blob = (trained / "best.safetensors").read_bytes()
    (torn / "best.safetensors").write_bytes(blob[: len(blob) // 2])
    return {"data": str(corpus), "run": str(trained), "pkl": str(pkl), "unlabelled": str(root /
            "unlabelled.safetensors"), "empty_ckpt": str(empty), "torn_ckpt": str(torn)}


@pytest.mark.parametrize("argv, code, words", MISUSE, ids=[" ".join(a[:1] + a[3:])[:60] for a, _, _ in MISUSE])
def test_cli_misuse_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, misuse_inputs, argv, code, words):
    values = {**misuse_inputs, "tmp": str(tmp_path)}
    for key, value in values.items():
        argv = [a.replace("{" + key + "}", value) for a in argv]
    watched = [tmp_path, Path(misuse_inputs["run"]), Path(misuse_inputs["data"]).parent]
    before = [snapshot(w) for w in watched]
    refused(capsys, argv, code, *words)
    assert [snapshot(w) for w in watched] == before
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(capsys, tmp_path, corpus):
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--out", str(tmp_path / "o"), "--epochs", "0", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_read_only_output_folder_is_a_one_line_error(tmp_path, capsys, corpus):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, ["train", "--preset", "iemocap",
                         "--data", str(corpus), "--out", str(ro / "run"), "--epochs", "1"], 1, str(ro))
    finally:
        ro.chmod(0o755)


def test_a_full_disk_is_a_one_line_error_and_leaves_no_temporary(tmp_path, capsys, corpus, monkeypatch):
    import errno

    import cmath_mer.training.checkpoint as ckpt

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(ckpt, "save_file", full)
    out = tmp_path / "run"
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out),
                     "--no-progress"], 1, "no space left")
    assert sorted(p.name for p in out.iterdir()) == []             # no torn file, no temporary, no lock


def test_seed_runs_are_run_folders_too(tmp_path, capsys, corpus):
    out = tmp_path / "seeds"
    argv = ["train", "--preset", "iemocap",
            "--data", str(corpus), "--epochs", "1", "--set", TINY_SET, "--out", str(out), "--seeds", "0,1",
            "--no-progress", "--keep-last"]
    assert main(argv) == 0
    before = snapshot(out)
    refused(capsys, argv, 2, "seed-0", "--resume")
    assert snapshot(out) == before
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv + ["--resume"]) == 0
    for s in (0, 1):
        assert [r["epoch"] for r in json.loads((out / f"seed-{s}" / "metrics.json").read_text())["history"]] == [1, 2]
