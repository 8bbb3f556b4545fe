"""featurize --finetune: the text encoder fitted on train, chosen on valid, never reading test labels; the
saved encoder, its reuse, predict on a CSV with it, and the one-line errors. A tiny random BERT made here
stands in for MiniLM (same code path: a Hugging Face folder loaded by sentence-transformers), so each test
takes seconds."""
from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import DataError, load_dataset
from cmath_mer.featurize import FinetuneOptions, encoder_folder, featurize, featurize_for_model
from cmath_mer.featurize import finetune as ft
from cmath_mer.featurize.text import folder_encoder

from helpers import write_csv

pytest.importorskip("sentence_transformers")

HEADER = ["conversation_id", "utterance_id", "speaker", "text", "label", "split"]
LINES = {"joy": ["That is wonderful news!", "I love it, thank you!", "Yay, we won!"],
         "anger": ["Get out of my room!", "This is unacceptable.", "Stop shouting at me!"],
         "neutral": ["The meeting is at noon.", "I will take the bus.", "It is on the table."]}
FAST = FinetuneOptions(epochs=2, lr=1e-3, batch_size=16)


def rows(seed: int, conversations: int = 24) -> list[list]:
    """Conversations of 2-4 utterances, every fourth one in test; the rest train (valid is carved)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(conversations):
        for u in range(int(rng.integers(2, 5))):
            label = list(LINES)[int(rng.integers(3))]
            out.append([f"d{c}", u, ["Ann", "Bob"][int(rng.integers(2))], LINES[label][int(rng.integers(3))],
                        label, "test" if c % 4 == 3 else "train"])
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer BERT of width 32 with a word-level vocabulary of the test sentences."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("tiny")
    words = sorted({w for ls in LINES.values() for s in ls
                    for w in s.lower().replace("!", " !").replace(".", " .").replace(",", " ,").split()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "hi", "sorry", "."]))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab.read_text().split("\n")), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = folder / "model"
    BertModel(config).save_pretrained(model)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model)
    return str(model)


def run(tmp_path, name: str, table_rows, tiny_model, options=FAST, **kw):
    table = write_csv(tmp_path / f"{name}.csv", HEADER, table_rows)
    out = tmp_path / f"{name}.safetensors"
    data = featurize([str(table)], out, text_encoder=tiny_model, finetune=options, progress=False,
                     log=lambda *_: None, **kw)
    return data, out


def test_test_labels_are_never_read(tmp_path, tiny_model):
    table = rows(0)
    scrambled = [r if r[5] != "test" else [*r[:4], ["joy", "anger", "neutral"][i % 3], r[5]]
                 for i, r in enumerate(table)]
    assert scrambled != table
    a, _ = run(tmp_path, "a", table, tiny_model)
    b, _ = run(tmp_path, "b", scrambled, tiny_model)
    assert not torch.equal(a.labels, b.labels)
    assert a.features["text"].numpy().tobytes() == b.features["text"].numpy().tobytes()
    assert a.metadata["encoders"]["text"]["fingerprint"] == b.metadata["encoders"]["text"]["fingerprint"]
    # the same rows with a training label changed do make another encoder (the check can fail)
    edited = [r if r[0] != "d0" else [*r[:4], "anger" if r[4] != "anger" else "joy", r[5]] for r in table]
    c, _ = run(tmp_path, "c", edited, tiny_model)
    assert a.features["text"].numpy().tobytes() != c.features["text"].numpy().tobytes()


def test_carved_valid_split_is_marked_and_recorded(tmp_path, tiny_model):
    data, out = run(tmp_path, "t", rows(1), tiny_model)
    rec = load_dataset(out).metadata["encoders"]["text"]
    assert rec["finetune"]["fitted_on"] == "train" and rec["finetune"]["chosen_on"] == "valid"
    assert rec["finetune"]["valid_carved_from_train"] is True
    assert rec["finetune"]["base_model"] == tiny_model and rec["model"] == str(encoder_folder(out).resolve())
    assert 0 <= rec["finetune"]["valid_weighted_f1"] <= 100
    splits = np.array(data.splits)
    assert (splits == "valid").sum() == round(0.1 * 18) and (splits == "test").sum() == 6
    # the conversations marked valid are the ones fine-tuning was validated on: train.make_splits's draw
    from cmath_mer.training.prepare import make_splits
    before = featurize([str(tmp_path / "t.csv")], None, text_encoder=_FakeEncoder(), progress=False)
    assert make_splits(before, 0.1, 0)["valid"] == [i for i, s in enumerate(data.splits) if s == "valid"]


class _FakeEncoder(ft.TextEncoder):
    def __init__(self):
        super().__init__(None, {"kind": "fake", "name": "fake", "fingerprint": "0" * 16, "dim": 2})

    def encode(self, texts, progress=True):
        return torch.zeros(len(texts), 2)


def _weights_digest(net) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_early_stopping_keeps_the_best_valid_epoch(tmp_path, tiny_model, monkeypatch):
    scores = iter([40.0, 70.0, 60.0, 65.0, 99.0])           # best at epoch 2, then two epochs without
    seen = []

    def scripted(net, classifier, texts, labels, class_names, autocast):
        assert set(texts) <= {s for ls in LINES.values() for s in ls}
        seen.append(_weights_digest(net))
        return next(scores)
    monkeypatch.setattr(ft, "valid_score", scripted)
    options = FinetuneOptions(epochs=5, lr=1e-3, batch_size=16, patience=2)
    data, out = run(tmp_path, "e", rows(2), tiny_model, options)
    rec = load_dataset(out).metadata["encoders"]["text"]["finetune"]
    assert len(seen) == 4 and len(set(seen)) == 4               # stopped after 2 epochs without a better one
    assert rec["epoch"] == 2 and rec["valid_weighted_f1"] == 70.0
    saved = folder_encoder(encoder_folder(out), "cpu", name="x", model_id="x")
    assert _weights_digest(saved.model) == seen[1]


def test_saved_encoder_reproduces_the_features_and_reruns_reuse_it(tmp_path, tiny_model, monkeypatch):
    data, out = run(tmp_path, "s", rows(3), tiny_model)
    texts = data.metadata["transcript"]["texts"]
    saved = folder_encoder(encoder_folder(out), "cpu", name="x", model_id="x")
    again = saved.encode(texts, progress=False)
    torch.testing.assert_close(again, data.features["text"], rtol=0, atol=1e-6)
    assert saved.record["fingerprint"] == data.metadata["encoders"]["text"]["fingerprint"]
    assert not list(tmp_path.glob(".*.tmp"))                     # no temporary folder left behind

    def no_training(*a, **k):
        raise AssertionError("fine-tuned again")
    monkeypatch.setattr(ft, "_train", no_training)
    before = out.read_bytes()
    run(tmp_path, "s", rows(3), tiny_model)                      # same rows and options: reused
    assert out.read_bytes() == before
    with pytest.raises(AssertionError, match="fine-tuned again"):  # another option: fitted anew
        run(tmp_path, "s", rows(3), tiny_model, FinetuneOptions(epochs=2, lr=2e-3, batch_size=16))


def test_interrupted_finetune_leaves_no_output_and_no_folder(tmp_path, tiny_model, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "k", rows(4), tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.csv"]


def test_a_folder_not_made_by_finetune_is_not_replaced(tmp_path, tiny_model):
    mine = tmp_path / "m.safetensors.encoder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a fine-tuned encoder"):
        run(tmp_path, "m", rows(5), tiny_model)
    assert (mine / "notes.txt").read_text() == "mine"


def test_predict_on_a_csv_uses_the_finetuned_encoder(tmp_path, tiny_model, capsys):
    data, out = run(tmp_path, "p", rows(6), tiny_model)
    run_dir = tmp_path / "run"
    small = json.dumps({"d_model": 16, "d_hidden": 16, "n_heads": 2})
    assert main(["train", "--preset", "iemocap",
                 "--data", str(out), "--epochs", "1", "--out", str(run_dir), "--no-progress",
                 "--set", small]) == 0
    new = [["x", 0, "Eve", "Yay, we won!"], ["x", 1, "Dan", "Stop shouting at me!"]]
    ask = write_csv(tmp_path / "ask.csv", HEADER[:4], new)
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run_dir), "--data", str(ask), "--out", str(preds),
                 "--no-progress"]) == 0
    with open(preds, newline="") as f:
        assert [r["text"] for r in csv.DictReader(f)] == ["Yay, we won!", "Stop shouting at me!"]
    from cmath_mer.training.evaluate import load_trained
    config = load_trained(run_dir, "cpu").config
    asked, _ = featurize_for_model(str(ask), config, progress=False)
    texts = data.metadata["transcript"]["texts"]
    for i, (_, _, _, text) in enumerate(new):
        torch.testing.assert_close(asked.features["text"][i], data.features["text"][texts.index(text)],
                                   rtol=0, atol=1e-6)
    # without the fine-tuned folder there is nothing to featurize with: a one-line error, exit 1
    import shutil
    shutil.rmtree(encoder_folder(out))
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run_dir), "--data", str(ask), "--out", str(preds),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "is not on this machine" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option, value, message", [
    ("--epochs", "0", "--epochs 0: must be an integer of at least 1"),
    ("--lr", "-1", "--lr -1.0: must be a positive number"),
    ("--max-tokens", "1", "--max-tokens 1: must be an integer of at least 2"),
    ("--patience", "0", "--patience 0: must be an integer of at least 1"),
])
def test_bad_option_is_a_one_line_error(tmp_path, tiny_model, capsys, option, value, message):
    table = write_csv(tmp_path / "t.csv", HEADER, rows(7))
    out = tmp_path / "t.safetensors"
    assert main(["featurize", str(table), "--out", str(out), "--text-encoder", tiny_model, "--finetune",
                 option, value, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["featurize", str(table), "--out", str(out), "--text-encoder", tiny_model, option, value]) == 2
    assert f"{option} applies only with --finetune" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_a_table_without_train_labels_is_a_one_line_error(tmp_path, tiny_model, capsys):
    unlabelled = [[*r[:4], "" if r[5] == "train" else r[4], r[5]] for r in rows(8)]
    table = write_csv(tmp_path / "u.csv", HEADER, unlabelled)
    assert main(["featurize", str(table), "--out", str(tmp_path / "u.safetensors"), "--text-encoder",
                 tiny_model, "--finetune", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "u.csv: field 'label': --finetune needs labelled training utterances" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.csv"]
