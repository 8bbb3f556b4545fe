"""Nothing is written outside the folder the user named: every name that becomes a path component (a
sweep's recipe names, seed folders, cache files) is one safe component, or the command is refused with a
one-line error before anything is written; and the multi-run folders (`train --seeds`, `sweep`) follow the
single run's folder contract (new or empty, or theirs; --resume / --overwrite; the user's files kept)."""
from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import pytest

import cmath_mer.training.seeds as seeds_module  # the runs of --seeds and sweep train through seeds.train
from cmath_mer.cli import main
from cmath_mer.errors import UsageError
from cmath_mer.paths import path_component

from helpers import refused

DIMS = {"text": 12, "audio": 10, "visual": 6}
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------------------------- path components

def test_safe_names_are_kept_as_they_are():
    rng = random.Random()
    alphabet = string.ascii_letters + string.digits + "._-+=@,"
    for _ in range(200):
        name = rng.choice(string.ascii_letters + string.digits) + "".join(
            rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        assert path_component(name, "recipe name") == name
    assert path_component(rng.randrange(10 ** 6), "seed") .isdigit()


@pytest.mark.parametrize("name", ["..", ".", "", "../../escape", "/tmp/abs", "a/b", "a\\b", ".hidden", "-rf",
                                  "a\0b", "x" * 129, "tab\tname", "new\nline", "sp ace", 1.5, True, None, ["a"]])
def test_unsafe_names_are_refused_naming_what_they_are(name):
    with pytest.raises(UsageError, match="recipe name"):
        path_component(name, "--grid g.json: recipe name")


@pytest.mark.parametrize("name", ["../../sweep_escape", "ABSOLUTE", "a/b", ".."])
def test_a_sweep_recipe_named_as_a_path_is_refused_before_anything_is_written(tmp_path, capsys, corpus, name):
    name = str(tmp_path / "abs_escape") if name == "ABSOLUTE" else name
    work = tmp_path / "w"
    (work / "sw" / "deep").mkdir(parents=True)
    grid = work / "g.json"
    grid.write_text(json.dumps({"ok": {"model": TINY, "train": {"epochs": 1}}, name: {"model": TINY}}))
    before = snapshot(tmp_path)
    refused(capsys, ["sweep", "--data", str(corpus), "--grid", str(grid), "--seeds", "0",
                     "--out", str(work / "sw" / "deep" / "out"), "--no-progress"], 2, "--grid", "recipe name")
    assert snapshot(tmp_path) == before


def test_a_feature_cache_file_stays_inside_the_cache_folder(tmp_path):
    from cmath_mer.featurize.cache import FeatureCache
    cache = FeatureCache(tmp_path / "c")
    for key in ("../../x", "/abs", "enc\0odd", "".join(random.choices(string.printable, k=50))):
        assert cache._file(key).parent == tmp_path / "c"


# ----------------------------------------------------------------------------------- multi-run folders

def seeds_argv(corpus, out, seeds="0", epochs=1):
    return ["train", "--preset", "iemocap",
            "--data", str(corpus), "--epochs", str(epochs), "--set", json.dumps(TINY), "--out", str(out),
            "--seeds", seeds, "--no-progress"]


def sweep_argv(corpus, grid, out, seeds="0"):
    return ["sweep", "--data", str(corpus), "--grid", str(grid), "--seeds", seeds, "--out", str(out),
            "--no-progress"]


@pytest.fixture
def grid(tmp_path) -> Path:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"a": {"model": TINY, "train": {"epochs": 2}},
                                "b": {"model": {**TINY, "class_weights": False}, "train": {"epochs": 2}}}))
    return path


@pytest.mark.parametrize("command", ["seeds", "sweep"])
@pytest.mark.parametrize("users", ["summary.json", "sweep.md", "notes.txt", "seed-0"])
def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path, capsys, corpus, grid, command, users):
    out = tmp_path / "userdir"
    out.mkdir()
    if users == "seed-0":
        (out / users).mkdir()
        (out / users / "mine.txt").write_text(str(random.random()))
    else:
        (out / users).write_text(str(random.random()))
    before = snapshot(out)
    argv = seeds_argv(corpus, out) if command == "seeds" else sweep_argv(corpus, grid, out)
    for extra in ([], ["--overwrite"], ["--resume"]):
        refused(capsys, argv + extra, 2, str(out))
        assert snapshot(out) == before


@pytest.mark.parametrize("command", ["seeds", "sweep"])
def test_a_multi_run_is_never_put_inside_a_single_run(tmp_path, capsys, corpus, grid, command):
    out = tmp_path / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(corpus), "--epochs", "1", "--set", json.dumps(TINY), "--out", str(out),
                 "--no-progress"]) == 0
    before = snapshot(out)
    argv = seeds_argv(corpus, out, "0,1") if command == "seeds" else sweep_argv(corpus, grid, out)
    for extra in ([], ["--overwrite"], ["--resume"]):
        refused(capsys, argv + extra, 2, "single training run")
        assert snapshot(out) == before


def test_seeds_and_sweep_folders_are_not_mistaken_for_each_other(tmp_path, capsys, corpus, grid):
    seeds_out = tmp_path / "seeds"
    assert main(seeds_argv(corpus, seeds_out)) == 0
    before = snapshot(seeds_out)
    refused(capsys, sweep_argv(corpus, grid, seeds_out) + ["--overwrite"], 2, "train --seeds")
    refused(capsys, ["train", "--preset", "iemocap",
                     "--data", str(corpus), "--out", str(seeds_out), "--overwrite"], 2, "not a run folder")
    assert snapshot(seeds_out) == before


def test_seeds_overwrite_replaces_its_own_runs_and_nothing_else(tmp_path, capsys, corpus):
    out = tmp_path / "seeds"
    assert main(seeds_argv(corpus, out, "0,1")) == 0
    refused(capsys, seeds_argv(corpus, out, "2"), 2, "--resume", "--overwrite")
    assert main(seeds_argv(corpus, out, "2") + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["seed-2", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["seeds"] == [2]


def test_resume_of_a_folder_without_runs_is_refused(tmp_path, capsys, corpus, grid):
    for argv in (seeds_argv(corpus, tmp_path / "new1"), sweep_argv(corpus, grid, tmp_path / "new2")):
        refused(capsys, argv + ["--resume"], 2, "nothing to resume")
    assert not (tmp_path / "new1").exists() and not (tmp_path / "new2").exists()


class Interrupt(Exception):
    pass


def interrupt_in(monkeypatch, where: str):
    """Stop the training of the run folder whose path ends in `where` after its first epoch (once)."""
    real = seeds_module.train
    done = []

    def stopping(data, config, tcfg, out, **kw):
        if str(out).endswith(where) and not done:
            done.append(out)

            def log(line):
                if line.startswith("epoch   1/"):
                    raise Interrupt
            kw["log"] = log
        return real(data, config, tcfg, out, **kw)
    monkeypatch.setattr(seeds_module, "train", stopping)
    return done


def without_speed(metrics: dict) -> dict:
    return {**metrics, "history": [{k: v for k, v in r.items() if k != "utterances_per_second"}
                                   for r in metrics["history"]]}


@pytest.mark.parametrize("command", ["seeds", "sweep"])
def test_an_interrupted_multi_run_resumes_to_the_uninterrupted_result(tmp_path, capsys, corpus, grid, monkeypatch,
                                                                      command):
    def argv(out):
        return seeds_argv(corpus, out, "0,1", epochs=2) if command == "seeds" else sweep_argv(corpus, grid, out, "0,1")
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(argv(ref)) == 0
    hit = interrupt_in(monkeypatch, "seed-1" if command == "seeds" else "b/seed-0")
    with pytest.raises(Interrupt):
        main(argv(out))
    assert hit
    monkeypatch.undo()
    finished = out / ("seed-0" if command == "seeds" else "a")
    kept = {k: v for k, v in snapshot(finished).items() if k.endswith(".safetensors")}
    refused(capsys, argv(out), 2, "--resume")                     # the same command without --resume
    assert main(argv(out) + ["--resume"]) == 0
    assert {k: v for k, v in snapshot(finished).items() if k.endswith(".safetensors")} == kept
    runs = sorted(p.relative_to(ref) for p in ref.rglob("metrics.json"))
    assert runs == sorted(p.relative_to(out) for p in out.rglob("metrics.json")) and len(runs) >= 2
    for run in runs:
        assert without_speed(json.loads((out / run).read_text())) == without_speed(json.loads((ref / run).read_text()))
    summary = "summary.json" if command == "seeds" else "sweep.json"
    assert json.loads((out / summary).read_text()) == json.loads((ref / summary).read_text())


# ------------------------------------------------------------------------------------------ sweep grids

BAD_GRIDS = [
    ("not json {", "not valid JSON"),
    ("[1, 2]", "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"a": 3}', "recipe 'a': expected an object"),
    ('{"a": {"model": [1]}}', "'model' must be an object"),
    ('{"a": {"optim": {}}}', "unknown key 'optim'"),
    ('{"a": {"model": {"num_classes": 3}}}', "comes from"),
    ('{"a": {"model": {"class_names": ["x"]}}}', "comes from"),
    ('{"a": {"train": {"seed": 3}}}', "comes from --seeds"),
    ('{"a": {"train": {"epoch": 3}}}', "not a field of TrainConfig"),
    ('{"ok": {"train": {"epochs": 1}}, "b": {"model": {"dropout": 7}}}', "recipe 'b'"),
    ('{"ok": {"train": {"epochs": 1}}, "b": {"train": {"lr": -1}}}', "recipe 'b'"),
    ('{"ok": {"train": {"epochs": 1}}, "b": {"model": {"d_model": "wide"}}}', "recipe 'b'"),
    ("[" * 100_000 + "]" * 100_000, "--grid"),
]


@pytest.mark.parametrize("text,words", BAD_GRIDS, ids=range(len(BAD_GRIDS)))
def test_the_whole_grid_is_checked_before_anything_trains(tmp_path, capsys, corpus, monkeypatch, text, words):
    def never(*a, **k):
        raise AssertionError("trained before the grid was checked")
    monkeypatch.setattr(seeds_module, "train", never)
    path = tmp_path / "grid.json"
    path.write_text(text)
    refused(capsys, sweep_argv(corpus, path, tmp_path / "out"), 2, f"--grid {path}", words)
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_empty_modalities_and_a_missing_grid(tmp_path, capsys, corpus, grid):
    refused(capsys, sweep_argv(corpus, grid, tmp_path / "o") + ["--modalities", ""], 2, "--modalities")
    refused(capsys, sweep_argv(corpus, tmp_path / "none.json", tmp_path / "o"), 2, "--grid", "no such file")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("command", ["seeds", "sweep"])
def test_a_multi_run_killed_before_any_run_began_starts_anew(tmp_path, capsys, corpus, grid, command, resume):
    """Its marker and a lock, no run begun: the same command starts it, with or without --resume (an interrupted
    command continues however early the kill came)."""
    from cmath_mer.training.multi_run import MARKER
    from cmath_mer.training.run_folder import LOCK_NAME
    out = tmp_path / "out"
    first = "seed-0" if command == "seeds" else "a"
    (out / first).mkdir(parents=True)
    (out / first / LOCK_NAME).write_text("1\n")
    (out / MARKER).write_text(json.dumps({"kind": command, "children": [first]}))
    argv = seeds_argv(corpus, out) if command == "seeds" else sweep_argv(corpus, grid, out)
    assert main(argv + (["--resume"] if resume else [])) == 0, capsys.readouterr()
    assert (out / ("summary.json" if command == "seeds" else "sweep.json")).exists()
