"""The project's safetensors format: round trip, header metadata, convert, synth, load_dataset dispatch."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmath_mer.data import (
    FORMAT,
    DataError,
    convert,
    file_format,
    load_dataset,
    load_safetensors,
    make_synthetic,
    save_dataset,
    synth,
    write_peer_pickle,
)


def _small(seed=0, preset="iemocap", **kw):
    kw.setdefault("input_dims", {"text": 16, "audio": 12, "visual": 8})
    return make_synthetic(preset, conversations=12, min_length=1, max_length=20, seed=seed, **kw)


def _assert_same(a, b, exact=True):
    assert a.conversation_ids == b.conversation_ids and a.splits == b.splits
    assert a.class_names == b.class_names and a.num_speakers == b.num_speakers
    assert a.speaker_names == b.speaker_names
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.speakers, b.speakers)
    assert a.modalities == b.modalities
    for m in a.modalities:
        assert a.features[m].dtype == torch.float32
        if exact:
            assert torch.equal(a.features[m], b.features[m]), m
        else:
            torch.testing.assert_close(a.features[m], b.features[m], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("preset", ["iemocap", "meld"])
def test_safetensors_round_trip(tmp_path, preset):
    ds = _small(1, preset)
    path = save_dataset(ds, tmp_path / "d.safetensors")
    back = load_dataset(path)
    _assert_same(back, ds)
    assert back.source == str(path)
    assert not list(tmp_path.glob("*.tmp"))
    b = back.batch([0, 2], ("text", "visual"))                # usable as any dataset
    assert b.features["text"].shape[0] == b.num_utterances == int(b.cu_seqlens[-1])


def test_header_metadata_and_tensors(tmp_path):
    ds = _small(2)
    path = save_dataset(ds, tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("splits").dtype == torch.int8
        assert f.get_tensor("cu_seqlens").shape == (len(ds) + 1,)
    assert keys == {"features.text", "features.audio", "features.visual", "speakers", "labels", "cu_seqlens",
                    "splits"}
    assert header["format"] == FORMAT
    meta = json.loads(header["cmath_mer"])
    assert meta["class_names"] == list(ds.class_names)
    assert meta["modalities"] == ["text", "audio", "visual"]
    assert meta["conversation_ids"] == ds.conversation_ids
    assert meta["num_speakers"] == 2 and meta["speaker_names"] == ["M", "F"]
    assert meta["splits"] == ["train", "valid", "test"]
    assert meta["source"].startswith("synthetic")


def test_half_precision_storage_and_modality_subset(tmp_path):
    ds = _small(3)
    path = save_dataset(ds, tmp_path / "h.safetensors", feature_dtype="bfloat16")
    _assert_same(load_dataset(path), ds, exact=False)
    sub = load_safetensors(path, modalities=("audio",))
    assert sub.modalities == ("audio",)
    with pytest.raises(DataError, match="features.speech"):
        load_safetensors(path, modalities=("speech",))


@pytest.mark.parametrize("layout", ["12", "14", "9", "10", "13"])
def test_convert_pickle_to_safetensors(tmp_path, layout):
    preset = "iemocap" if layout in ("12", "9") else "meld"
    ds = _small(4, preset)
    pkl = write_peer_pickle(ds, tmp_path / "in.pkl", layout)
    out = tmp_path / "out.safetensors"
    convert(pkl, out)
    _assert_same(load_dataset(out), load_dataset(pkl))
    back = load_dataset(out)
    assert back.splits == ds.splits and torch.equal(back.features["text"], ds.features["text"])


def test_convert_options_text_field_and_modalities(tmp_path):
    ds = _small(5)
    pkl = write_peer_pickle(ds, tmp_path / "in.pkl", "12")
    out = tmp_path / "o.safetensors"
    convert(pkl, out, text_field=1, modalities=("text", "visual"), feature_dtype="float16")
    back = load_dataset(out)
    assert back.modalities == ("text", "visual")
    torch.testing.assert_close(back.features["text"], ds.features["text"] * 2, rtol=1e-3, atol=1e-2)


def test_convert_refuses_bad_input_and_writes_nothing(tmp_path):
    pkl = tmp_path / "bad.pkl"
    pkl.write_bytes(b"\x80\x04garbage")
    out = tmp_path / "o.safetensors"
    with pytest.raises(DataError, match="bad.pkl"):
        convert(pkl, out)
    assert not out.exists()


def test_load_dataset_detects_format_by_content(tmp_path):
    ds = _small(6)
    st = save_dataset(ds, tmp_path / "data.bin")               # no telling suffix
    pk = write_peer_pickle(ds, tmp_path / "data.dat", "9")
    assert file_format(st) == "safetensors" and file_format(pk) == "pickle"
    _assert_same(load_dataset(st), ds)
    assert torch.equal(load_dataset(pk).labels, ds.labels)
    other = tmp_path / "x.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="unrecognised"):
        load_dataset(other)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.safetensors")


def test_a_checkpoint_is_not_a_dataset(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(DataError, match="not a cmath-mer dataset"):
        load_dataset(path)


def test_load_validates_contents(tmp_path):
    ds = _small(7)
    ds.features["visual"][ds.lengths()[0] + 1, 2] = float("nan")   # second conversation, utterance 1
    path = save_dataset(ds, tmp_path / "nan.safetensors")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert str(path) in msg and repr(ds.conversation_ids[1]) in msg and "features.visual" in msg
    assert "utterance 1" in msg
    assert load_safetensors(path, validate=False).labels.shape == ds.labels.shape

    ds = _small(8)
    ds.labels[3] = 9
    path = save_dataset(ds, tmp_path / "lab.safetensors")
    with pytest.raises(DataError, match="'labels'.*label 9"):
        load_dataset(path)


def test_synth_writes_safetensors_and_peer_pickles(tmp_path):
    a = synth(tmp_path / "s.safetensors", preset="meld", conversations=20, min_length=2, max_length=6, seed=3,
              input_dims={"text": 8, "audio": 4, "visual": 4})
    _assert_same(load_dataset(tmp_path / "s.safetensors"), a)
    assert len(a) == 20 and min(a.lengths()) >= 2 and max(a.lengths()) <= 6
    b = synth(tmp_path / "s.pkl", layout="14", preset="meld", conversations=20, min_length=2, max_length=6, seed=3,
              input_dims={"text": 8, "audio": 4, "visual": 4})
    back = load_dataset(tmp_path / "s.pkl")
    assert back.splits == b.splits and torch.equal(back.features["audio"], b.features["audio"])


def test_synthetic_by_name():
    ds = load_dataset("synthetic:meld", conversations=5, input_dims={"text": 4})
    assert len(ds) == 5 and ds.num_classes == 7 and ds.modalities == ("text",)
