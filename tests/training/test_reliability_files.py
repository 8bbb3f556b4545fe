"""Nothing wrong is accepted in silence: a run is finished only when all its files are written, a
checkpoint's tensors are checked against the SHA-256 they were saved with, a damaged feature-cache vector
is computed again, and every temporary a killed writer can leave is recognised and removed."""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cmath_mer.training.train as train_module
from cmath_mer.cli import main
from cmath_mer.errors import CheckpointError
from cmath_mer.files import atomic_write
from cmath_mer.training.checkpoint import read_metadata, tensor_sha256
from cmath_mer.training.evaluate import load_trained
from cmath_mer.training.run_folder import LOCK_NAME

DIMS = {"text": 12, "audio": 10, "visual": 6}
TINY = json.dumps({"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16})


def train_argv(corpus, out, *extra):
    return ["train", "--preset", "iemocap",
            "--data", str(corpus), "--epochs", "1", "--set", TINY, "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_argv(corpus, out, "--keep-last")) == 0        # last.safetensors kept, to be resumed
    return out


def run_copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def one_line_error(capsys, argv, code, *words) -> str:
    assert main(argv) == code
    said = capsys.readouterr().err.strip()
    err = said.splitlines()[-1]                    # after the notes --resume gives (e.g. the new --epochs)
    assert err.startswith("cmath-mer: error: ") and "Traceback" not in said, said
    for w in words:
        assert w in err, (w, err)
    return err


# ------------------------------------------------------------------------- finished only when all written

class Interrupt(Exception):
    pass


def test_a_kill_between_last_and_best_of_the_final_epoch_is_completed_by_resume(tmp_path, capsys, corpus,
                                                                               monkeypatch):
    real = train_module.save_weights

    def dies_before_best(path, *a, **k):
        raise Interrupt
    monkeypatch.setattr(train_module, "save_weights", dies_before_best)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        main(train_argv(corpus, out))
    monkeypatch.undo()
    assert real is train_module.save_weights
    assert (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()
    last = load_file(out / "last.safetensors")
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert read_metadata(out / "best.safetensors")["state"]["epoch"] == 1
    best = load_file(out / "best.safetensors")
    # best holds the evaluated weights of that epoch: the average in place of the parameters it averages
    assert all(k.startswith("model.") for k in best)
    for k, v in best.items():
        want = last.get("average." + k[len("model."):], last[k])
        assert torch.equal(v, want), k
    assert not (out / "last.safetensors").exists()                  # the run finished: last removed
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1


# ---------------------------------------------------------------------------------- checkpoint hashes

def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) byte offsets of each tensor's data in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]}


def flip_a_byte(path: Path, prefix: str) -> str:
    ranges = {k: r for k, r in tensor_ranges(path).items() if k.startswith(prefix)}
    name = random.choice(sorted(ranges))
    start, end = ranges[name]
    raw = bytearray(path.read_bytes())
    raw[random.randrange(start, end)] ^= 1 << random.randrange(8)
    path.write_bytes(bytes(raw))
    return name


def test_every_checkpoint_tensor_carries_its_sha256(trained):
    for name in ("best.safetensors", "last.safetensors"):
        digests = read_metadata(trained / name)["sha256"]
        tensors = load_file(trained / name)
        assert digests == {k: tensor_sha256(v) for k, v in tensors.items()}


@pytest.mark.parametrize("prefix", ["model.", "average.", "optim."])
def test_one_flipped_bit_in_a_checkpoint_is_refused_naming_the_tensor(tmp_path, capsys, corpus, trained, prefix):
    out = run_copy(trained, tmp_path)
    if prefix != "optim.":                         # evaluate reads best: the weights (the average) alone
        name = flip_a_byte(out / "best.safetensors", "model.")
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            load_trained(out)
        one_line_error(capsys, ["evaluate", "--checkpoint", str(out), "--data", str(corpus)], 1, name,
                       "best.safetensors")
        shutil.copy(trained / "best.safetensors", out / "best.safetensors")
    name = flip_a_byte(out / "last.safetensors", prefix)           # --resume reads last (as many epochs)
    one_line_error(capsys, ["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                            "--no-progress"], 1, name, "last.safetensors", "SHA-256")


def test_checkpoints_from_before_the_hashes_still_load(tmp_path, trained):
    out = run_copy(trained, tmp_path)
    for ckpt in ("best.safetensors", "last.safetensors"):
        with safe_open(str(out / ckpt), framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
        save_file(load_file(out / ckpt), out / ckpt, metadata=meta)
        assert read_metadata(out / ckpt)["sha256"] is None
    x = load_trained(out)
    assert all(torch.isfinite(p).all() for p in x.parameters())


def test_nan_optimizer_moments_are_refused_on_resume(tmp_path, capsys, corpus, trained):
    out = run_copy(trained, tmp_path)
    for ckpt in ("last.safetensors",):                            # best holds no optimizer state
        with safe_open(str(out / ckpt), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(out / ckpt)
        name = random.choice(sorted(k for k in tensors if k.startswith("optim.") and tensors[k].is_floating_point()
                                    and tensors[k].numel() > 1))
        tensors[name].view(-1)[random.randrange(tensors[name].numel())] = float("nan")
        meta["sha256"] = json.dumps({k: tensor_sha256(v) for k, v in tensors.items()})   # hashes that agree
        save_file(tensors, out / ckpt, metadata=meta)
    one_line_error(capsys, ["train", "--data", str(corpus), "--out", str(out), "--resume", "--epochs", "2",
                            "--no-progress"], 1, "non-finite", "optim.")
    load_trained(out)                                      # the weights themselves still evaluate


# ------------------------------------------------------------------------------------- feature cache

def test_a_damaged_cache_vector_is_computed_again(tmp_path):
    from cmath_mer.featurize import cache_folder, featurize

    from helpers import HEADER, ROWS, fake_encoder, write_csv
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    out = tmp_path / "talk.safetensors"
    featurize([str(table)], out, text_encoder=fake_encoder(), progress=False)
    fresh = tmp_path / "fresh.safetensors"
    featurize([str(table)], fresh, text_encoder=fake_encoder(), cache=False, progress=False)
    (cache_file,) = cache_folder(out).iterdir()
    flip_a_byte(cache_file, "vectors")
    again = fake_encoder()
    featurize([str(table)], out, text_encoder=again, progress=False)
    assert len(again.model.encoded) == 1                      # the damaged vector, and it alone
    assert out.read_bytes() == fresh.read_bytes()


# --------------------------------------------------------------------------------------- temporaries

LEFT_BY_A_KILL = [".tmpA1b2C3", ".best.safetensors.k3j4h5g6.tmp", ".metrics.json.x9y8z7w6.tmp"]


@pytest.mark.parametrize("option", ["--resume", "--overwrite"])
def test_temporaries_a_kill_leaves_are_removed(tmp_path, corpus, trained, option):
    out = run_copy(trained, tmp_path)
    for name in LEFT_BY_A_KILL:                 # a file, or atomic_write's folder holding safetensors' file
        if random.random() < 0.5 and name.endswith(".tmp"):
            (out / name).mkdir()
            (out / name / ".tmpQ1w2E3").write_bytes(b"\0" * 64)
        else:
            (out / name).write_bytes(b"\0" * 64)
    argv = ["train", "--preset", "iemocap",
            "--data", str(corpus), "--out", str(out), "--no-progress", "--epochs", "2", option]
    assert main(argv + (["--set", TINY] if option == "--overwrite" else [])) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]


def test_a_failed_write_leaves_nothing_beside_the_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def writer(tmp):
        Path(tmp).write_bytes(b"new")
        (Path(tmp).parent / ".tmpZ9y8X7").write_bytes(b"sidecar")     # as safetensors does
        raise OSError(28, "No space left on device", tmp)
    with pytest.raises(OSError):
        atomic_write(target, writer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"] and target.read_bytes() == b"old"


def test_featurize_removes_what_a_killed_write_of_its_output_and_cache_left(tmp_path):
    from cmath_mer.featurize import cache_folder, featurize

    from helpers import HEADER, ROWS, fake_encoder, write_csv
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    out = tmp_path / "talk.safetensors"
    featurize([str(table)], out, text_encoder=fake_encoder(), progress=False)
    tag = "".join(random.choices("abcdefgh12345678", k=8))
    left = [tmp_path / f".talk.safetensors.{tag}.tmp", cache_folder(out) / f".{tag}.safetensors.{tag}.tmp",
            cache_folder(out) / ".tmpA1b2C3"]
    left[0].mkdir()
    (left[0] / ".tmpQ1w2E3").write_bytes(b"\0" * 32)
    for p in left[1:]:
        p.write_bytes(b"\0" * 32)
    users = [tmp_path / ".talk.csv.swp", tmp_path / f".other.safetensors.{tag}.tmp"]
    for p in users:
        p.write_text("mine")
    write_csv(table, HEADER, [r if r[3] != "No!" else [*r[:3], "Yes!", *r[4:]] for r in ROWS])
    featurize([str(table)], out, text_encoder=fake_encoder(), progress=False)
    assert not any(p.exists() for p in left)
    assert all(p.read_text() == "mine" for p in users)
