"""Bad input is refused with a one-line error naming the file, the row and the field, never accepted in
silence: the same conversation in two splits, JSONL values that are objects or lists, JSON nested too deeply,
duplicate or empty class names, a pickle name for convert's safetensors output; and a corpus without
validation conversations says how its epoch was selected."""
from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import DataError, make_synthetic, save_dataset, validate_dataset
from cmath_mer.featurize.tables import read_tables

from helpers import write_csv

HEADER = ["conversation_id", "utterance_id", "speaker", "text", "label"]


def random_table(path: Path, conversations: int = 3) -> Path:
    rng = random.Random()
    rows = [[f"c{c}", u, rng.choice("AB"), "".join(rng.choices(string.ascii_lowercase + " ", k=12)),
             rng.choice(["joy", "anger"])] for c in range(conversations) for u in range(rng.randrange(1, 4))]
    return write_csv(path, HEADER, rows)


def one_line_error(capsys, argv, code, *words) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("how", ["same file", "a copy"])
@pytest.mark.parametrize("splits", [("train", "test"), ("train", "valid"), ("valid", "test")])
def test_the_same_conversations_in_two_splits_are_refused(tmp_path, how, splits):
    table = random_table(tmp_path / "talk.csv")
    other = table
    if how == "a copy":
        other = tmp_path / "elsewhere.csv"
        other.write_bytes(table.read_bytes())
    with pytest.raises(DataError, match=r"conversation 'c\d+'.*also in .*a conversation belongs to one split"):
        read_tables([f"{table}:{splits[0]}", f"{other}:{splits[1]}"])


def test_tables_sharing_ids_but_not_conversations_are_kept_apart(tmp_path):
    a, b = random_table(tmp_path / "train.csv"), random_table(tmp_path / "dev.csv")   # ids c0.. in both (as MELD)
    corpus = read_tables([f"{a}:train", f"{b}:valid"])
    assert {u.split for conv in corpus.conversations for u in conv} == {"train", "valid"}


@pytest.mark.parametrize("field,value", [("text", {"a": 1}), ("text", ["x", "y"]), ("label", {"x": "joy"}),
                                         ("conversation_id", [1]), ("speaker", {"name": "A"}),
                                         ("speaker", [["A"]]), ("utterance_id", [0])])
def test_jsonl_objects_and_lists_are_refused_naming_line_and_field(tmp_path, field, value):
    rows = [{"conversation_id": "c", "utterance_id": i, "speaker": "A", "text": f"t{i}", "label": "joy"}
            for i in range(random.randrange(2, 6))]
    bad = random.randrange(len(rows))
    rows[bad][field] = value
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    role = {"conversation_id": "conversation", "utterance_id": "utterance"}.get(field, field)
    with pytest.raises(DataError, match=rf"t\.jsonl: line {bad + 1}: field '{role}'.*a JSON"):
        read_tables([str(path)])


def test_a_speaker_list_of_names_is_still_read(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"conversation_id": "c", "utterance_id": 0, "speaker": ["Ann", "Bob"],
                                "text": "hi", "label": "joy"}) + "\n")
    assert read_tables([str(path)]).conversations[0][0].speaker == "Ann & Bob"


def test_jsonl_nested_too_deeply_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    depth = random.randrange(50_000, 150_000)
    path.write_text('{"text": ' + "[" * depth + "]" * depth + "}\n")
    one_line_error(capsys, ["featurize", str(path), "--out", str(tmp_path / "o.safetensors")], 1,
                   "deep.jsonl", "line 1", "nested")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("names,why", [(("a", "b", "a"), "named twice"), (("a", "", "b"), "empty name"),
                                       (("a", " ", "b"), "empty name")])
def test_duplicate_or_empty_class_names_are_refused_naming_the_file(tmp_path, names, why):
    ds = make_synthetic(None, input_dims={"text": 4}, num_classes=3, conversations=3, min_length=2, max_length=3,
                        seed=random.randrange(1000))
    ds.class_names = names
    ds.source = "some.pkl"
    with pytest.raises(DataError, match=rf"some\.pkl: field 'class_names'.*{why}"):
        validate_dataset(ds)


def test_convert_refuses_a_pickle_name_for_its_safetensors_output(tmp_path, capsys):
    src = tmp_path / "d.safetensors"
    save_dataset(make_synthetic(None, input_dims={"text": 4}, num_classes=3, conversations=3, min_length=2,
                                max_length=3, seed=random.randrange(1000)), src)
    for suffix in (".pkl", ".PICKLE", ".p"):
        one_line_error(capsys, ["convert", str(src), str(tmp_path / f"out{suffix}")], 2, "safetensors", suffix)
        assert not (tmp_path / f"out{suffix}").exists()


def test_a_corpus_without_validation_says_what_was_selected_and_how(tmp_path, capsys):
    while True:       # the baselines need two classes among the training conversation's labels
        ds = make_synthetic(None, input_dims={"text": 6, "audio": 4}, num_classes=3, conversations=2, min_length=3,
                            max_length=6, seed=random.randrange(1000))
        ds.splits = ["train", "test"]
        if len({c for c in ds.labels[ds.cu_seqlens[0]:ds.cu_seqlens[1]].tolist() if c >= 0}) >= 2:
            break
    path = save_dataset(ds, tmp_path / "one_train.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--preset", "iemocap",
                 "--data", str(path), "--epochs", "2", "--out", str(out), "--no-progress", "--set",
                 json.dumps({"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16})]) == 0
    said = capsys.readouterr()
    assert "no validation conversations" in said.out and "selected on validation" not in said.out
    sel = json.loads((out / "metrics.json").read_text())["selected_by_validation"]
    assert sel["valid_weighted_f1"] is None and sel["selected_on"].startswith("training loss")
    assert f"selected on {sel['selected_on']}" in said.out
    assert torch.isfinite(torch.tensor(sel["weighted_f1"]))


def test_a_seeds_summary_says_how_the_epochs_were_chosen():
    """The --seeds summary line says the epoch was chosen on validation only when it was: seeds of data without
    validation conversations were chosen on training loss, and the line and summary.json say so."""
    from cmath_mer.training.seeds import summarise, summary_line

    def metrics(selected_on):
        sel = {"weighted_f1": random.uniform(30, 70), "accuracy": random.uniform(30, 70), "epoch": 2}
        if selected_on is not None:
            sel["selected_on"] = selected_on
        return {"selected_by_validation": sel}
    loss = "training loss (the data has no validation conversations)"
    summary = summarise({0: metrics(loss), 1: metrics(loss)})
    assert summary["selected_on"] == loss and f"(selected on {loss})" in summary_line(summary)
    summary = summarise({0: metrics("validation"), 1: metrics(None)})       # a run from before the field
    assert "(selected on validation)" in summary_line(summary)
