"""Peer pickles: every layout round-trips, hostile pickles are refused before they run, and every defect
is a DataError naming the file, the conversation and the field."""
from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest
import torch

from cmath_mer.data import (
    PEER_PICKLE_LAYOUTS,
    DataError,
    UnsafePickleError,
    check_compatible,
    load_dataset,
    load_peer_pickle,
    make_synthetic,
    write_peer_pickle,
)
from cmath_mer.model.config import preset

IEMOCAP_DIMS = {"text": 12, "audio": 10, "visual": 6}


def _data(layout: str, seed: int):
    """Fresh random synthetic data shaped like the corpus the layout comes from."""
    corpus = PEER_PICKLE_LAYOUTS[layout].corpus
    dims = dict(IEMOCAP_DIMS) if "visual" in PEER_PICKLE_LAYOUTS[layout].fields else {"text": 12, "audio": 10}
    return make_synthetic(corpus, conversations=9, min_length=1, max_length=15, input_dims=dims,
                          seed=seed, world_seed=seed)


def _assert_same(a, b, text_scale: float = 1.0):
    assert a.conversation_ids == b.conversation_ids
    assert a.splits == b.splits
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.speakers, b.speakers)
    assert a.num_speakers == b.num_speakers
    assert a.class_names == b.class_names
    assert a.modalities == b.modalities
    for m in a.modalities:
        want = b.features[m] * text_scale if m == "text" else b.features[m]
        assert torch.equal(a.features[m], want), m


@pytest.mark.parametrize("layout", list(PEER_PICKLE_LAYOUTS))
def test_every_layout_round_trips_features_labels_speakers_splits(tmp_path, layout):
    ds = _data(layout, seed=len(layout) + 3)
    path = write_peer_pickle(ds, tmp_path / f"peer{layout}.pkl", layout)
    back = load_dataset(path)                       # layout detected from the content, names inferred
    _assert_same(back, ds)
    assert back.source == str(path)
    assert {"train", "valid", "test"} <= set(back.splits)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_any_pickle_protocol_and_list_vectors_load(tmp_path, protocol):
    ds = _data("9", seed=protocol)
    path = write_peer_pickle(ds, tmp_path / "p.pkl", "9", vectors="list" if protocol in (0, 4) else "array",
                             protocol=protocol)
    _assert_same(load_peer_pickle(path), ds)


def test_speaker_styles_letters_onehot_index(tmp_path):
    ds = _data("12", seed=5)
    for style in ("letters", "onehot", "index"):
        path = write_peer_pickle(ds, tmp_path / f"{style}.pkl", "12", speaker_style=style)
        back = load_peer_pickle(path, class_names=ds.class_names)
        assert torch.equal(back.speakers, ds.speakers), style
    assert load_peer_pickle(tmp_path / "letters.pkl").speaker_names == ("M", "F")


@pytest.mark.parametrize("layout,field,index", [("12", 2, 2), ("12", "roberta4", 3), ("14", 1, 1),
                                                 ("14", "text3", 3)])
def test_text_field_can_be_chosen(tmp_path, layout, field, index):
    ds = _data(layout, seed=11)
    path = write_peer_pickle(ds, tmp_path / "t.pkl", layout)   # text field j holds text * (j + 1)
    _assert_same(load_peer_pickle(path, text_field=field), ds, text_scale=index + 1.0)


def test_sets_of_ids_int_keys_and_a_validation_list_inside_train(tmp_path):
    """MELD-like: integer conversation keys, train/test ids as sets, the dev ids inside train and repeated in
    the last element: the dev conversations become 'valid'."""
    ds = _data("10", seed=2)
    path = write_peer_pickle(ds, tmp_path / "m.pkl", "10")
    obj = list(pickle.load(open(path, "rb")))
    remap = {c: i for i, c in enumerate(ds.conversation_ids)}
    for f in range(7):
        obj[f] = {remap[c]: v for c, v in obj[f].items()}
    valid = {remap[c] for c in obj[9]}
    obj[7] = {remap[c] for c in obj[7]} | valid
    obj[8] = {remap[c] for c in obj[8]}
    obj[9] = sorted(valid)
    pickle.dump(tuple(obj), open(path, "wb"), protocol=2)
    back = load_peer_pickle(path)
    assert back.conversation_ids == [str(i) for i in range(len(ds))]
    assert back.splits == ds.splits
    assert torch.equal(back.features["audio"], ds.features["audio"])


# --------------------------------------------------------------------------------------- hostile pickles

class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload,refused", [(_System, "system"), (_Eval, "builtins.eval")])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    ds = _data("12", seed=1)
    path = write_peer_pickle(ds, tmp_path / "evil.pkl", "12")
    obj = list(pickle.load(open(path, "rb")))
    obj[9] = {c: payload(marker) for c in obj[9]}          # hide it in the sentences
    pickle.dump(tuple(obj), open(path, "wb"), protocol=4)
    with pytest.raises(UnsafePickleError) as err:
        load_dataset(path)
    msg = str(err.value)
    assert str(path) in msg and refused in msg and "refused" in msg
    assert not marker.exists(), "the payload ran"
    # the test is meaningful: the stock unpickler does run it
    if payload is _Eval:
        pickle.load(open(path, "rb"))
        assert marker.exists()


def test_refused_global_at_top_level_and_other_globals(tmp_path):
    for i, (mod, name) in enumerate([("subprocess", "Popen"), ("numpy", "load"), ("builtins", "getattr"),
                                     ("torch", "load")]):
        path = tmp_path / f"g{i}.pkl"
        path.write_bytes(b"\x80\x02c" + mod.encode() + b"\n" + name.encode() + b"\n)R.")
        with pytest.raises(UnsafePickleError, match=f"{mod}.{name}"):
            load_peer_pickle(path)


# ------------------------------------------------------------------------------------------- bad inputs

def _tampered(tmp_path, layout, edit, seed=7):
    """Write fresh data in `layout`, edit the unpickled list in place, write it back; return (path, ds)."""
    ds = _data(layout, seed=seed)
    path = write_peer_pickle(ds, tmp_path / f"bad{layout}.pkl", layout)
    obj = list(pickle.load(open(path, "rb")))
    edit(obj, ds)
    pickle.dump(tuple(obj), open(path, "wb"), protocol=4)
    return path, ds


def _expect(path, *fragments, **options):
    with pytest.raises(DataError) as err:
        load_dataset(path, **options)
    msg = str(err.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


def _first_train(ds):
    return ds.conversation_ids[ds.splits.index("train")]


def test_unknown_layout_length(tmp_path):
    path = tmp_path / "eleven.pkl"
    pickle.dump(tuple({} for _ in range(11)), open(path, "wb"))
    _expect(path, "unknown layout", "11-tuple")
    path = tmp_path / "dict.pkl"
    pickle.dump({"a": 1}, open(path, "wb"))
    _expect(path, "unknown layout", "dict")


def test_unknown_layout_element_types(tmp_path):
    def edit(obj, ds):
        obj[8] = [1, 2, 3]                               # 'visual' is no longer a dict
    path, _ = _tampered(tmp_path, "12", edit)
    _expect(path, "unknown layout", "visual")


@pytest.mark.parametrize("layout,field", [("12", "audio"), ("9", "visual"), ("14", "text0"), ("12", "speakers"),
                                           ("10", "labels"), ("13", "sentences")])
def test_mismatched_lengths_name_conversation_and_field(tmp_path, layout, field):
    i = PEER_PICKLE_LAYOUTS[layout].index(field)

    def edit(obj, ds):
        c = _first_train(ds)
        obj[i][c] = obj[i][c][:-1] if len(obj[i][c]) > 1 else obj[i][c] * 2
    path, ds = _tampered(tmp_path, layout, edit)
    _expect(path, repr(_first_train(ds)), repr(field), "utterances")


def test_unused_text_field_is_only_checked_when_chosen(tmp_path):
    def edit(obj, ds):
        c = _first_train(ds)
        obj[5][c] = obj[5][c] * 2                                    # roberta3 has too many utterances
    path, ds = _tampered(tmp_path, "13", edit)
    _assert_same(load_dataset(path), ds)
    _expect(path, repr(_first_train(ds)), "'roberta3'", "utterances", text_field="roberta3")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(tmp_path, bad):
    def edit(obj, ds):
        c = ds.conversation_ids[-1]
        obj[PEER_PICKLE_LAYOUTS["9"].index("audio")][c][0][3] = bad
    path, ds = _tampered(tmp_path, "9", edit)
    _expect(path, repr(ds.conversation_ids[-1]), "'audio'", "non-finite", "utterance 0", "dimension 3")


def test_label_out_of_range(tmp_path):
    def edit(obj, ds):
        obj[2][ds.conversation_ids[1]][-1] = 6            # IEMOCAP has 6 classes: 0..5
    path, ds = _tampered(tmp_path, "12", edit)
    _expect(path, repr(ds.conversation_ids[1]), "'labels'", "label 6", "outside 0..5")


def test_empty_conversation(tmp_path):
    def edit(obj, ds):
        c = ds.conversation_ids[2]
        for f in PEER_PICKLE_LAYOUTS["9"].fields[:7]:
            obj[PEER_PICKLE_LAYOUTS["9"].index(f)][c] = []
    path, ds = _tampered(tmp_path, "9", edit)
    _expect(path, repr(ds.conversation_ids[2]), "'labels'", "empty")


def test_split_id_missing_from_data(tmp_path):
    def edit(obj, ds):
        obj[10] = list(obj[10]) + ["ghost_conversation"]
    path, _ = _tampered(tmp_path, "12", edit)
    _expect(path, "'ghost_conversation'", "'train ids'", "absent from the data")


def test_conversation_in_train_and_test(tmp_path):
    def edit(obj, ds):
        obj[8] = list(obj[8]) + [_first_train(ds)]
    path, ds = _tampered(tmp_path, "9", edit)
    _expect(path, repr(_first_train(ds)), "train ids", "test ids")


def test_unlisted_conversation_is_kept_as_valid_or_refused(tmp_path):
    def edit(obj, ds):
        obj[7] = [c for c in obj[7] if c != _first_train(ds)]
    path, ds = _tampered(tmp_path, "10", edit)                 # 10: the valid ids are listed too
    back = load_dataset(path)                                  # documented default: 'valid', not dropped
    assert len(back) == len(ds)
    assert back.splits[back.conversation_ids.index(_first_train(ds))] == "valid"
    assert load_dataset(path, unassigned="train").splits == ds.splits
    _expect(path, repr(_first_train(ds)), "train ids", unassigned="error")


def test_conversation_missing_from_one_field(tmp_path):
    def edit(obj, ds):
        del obj[PEER_PICKLE_LAYOUTS["14"].index("visual")][ds.conversation_ids[0]]
    path, ds = _tampered(tmp_path, "14", edit)
    _expect(path, repr(ds.conversation_ids[0]), "'visual'", "no entry")


def test_bad_one_hot_speaker(tmp_path):
    def edit(obj, ds):
        obj[1][ds.conversation_ids[0]][0] = [0.0] * ds.num_speakers
    path, ds = _tampered(tmp_path, "13", edit)
    _expect(path, repr(ds.conversation_ids[0]), "'speakers'", "one-hot")


def test_ragged_feature_widths(tmp_path):
    def edit(obj, ds):
        c = ds.conversation_ids[3]
        obj[3][c] = [v[:-1] for v in obj[3][c]]        # text narrower in one conversation
    path, ds = _tampered(tmp_path, "9", edit)
    _expect(path, repr(ds.conversation_ids[3]), "'text'", "dim")


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x80\x04this is not a pickle")
    _expect(path, "not a readable pickle")


def test_check_compatible_names_file_modality_and_dims(tmp_path):
    ds = _data("12", seed=3)
    path = write_peer_pickle(ds, tmp_path / "c.pkl", "12")
    back = load_dataset(path)
    cfg = preset("iemocap", input_dims=dict(IEMOCAP_DIMS, audio=99))
    with pytest.raises(DataError) as err:
        check_compatible(back, cfg)
    msg = str(err.value)
    assert str(path) in msg and "'audio'" in msg and "99" in msg and "10" in msg
    check_compatible(back, preset("iemocap", input_dims=IEMOCAP_DIMS))
    with pytest.raises(DataError, match="labels"):
        check_compatible(back, preset("meld", input_dims=IEMOCAP_DIMS))
    with pytest.raises(DataError, match="visual"):
        check_compatible(load_dataset(path, modalities=("text", "audio")), preset("iemocap", input_dims=IEMOCAP_DIMS))


def test_numpy_scalar_labels_and_float64_arrays(tmp_path):
    def edit(obj, ds):
        for c in obj[2]:
            obj[2][c] = [np.int64(v) for v in obj[2][c]]
            obj[3][c] = [np.asarray(v, dtype=np.float64) for v in obj[3][c]]
    path, ds = _tampered(tmp_path, "12", edit)
    _assert_same(load_dataset(path), ds)


def test_numpy1_module_names_and_python2_builtins_load(tmp_path):
    """Pickles written by numpy 1 name numpy.core.multiarray (numpy 2: numpy._core); Python 2 pickles name
    __builtin__. Both are allowed and resolve."""
    ds = _data("12", seed=9)
    path = write_peer_pickle(ds, tmp_path / "np1.pkl", "12", protocol=2)
    obj = list(pickle.load(open(path, "rb")))
    obj[10] = set(obj[10])                                     # protocol 2 spells this __builtin__.set
    raw = pickle.dumps(tuple(obj), protocol=2)
    assert b"__builtin__" in raw
    path.write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in path.read_bytes()
    _assert_same(load_dataset(path), ds)


def test_ignore_index_labels_are_kept_as_unlabelled(tmp_path):
    def edit(obj, ds):
        obj[2][ds.conversation_ids[0]][0] = -100
    path, ds = _tampered(tmp_path, "9", edit)
    assert int(load_dataset(path).labels[0]) == -100
    def edit2(obj, ds):
        obj[2][ds.conversation_ids[0]][0] = -1
    path, ds = _tampered(tmp_path, "9", edit2)
    _expect(path, repr(ds.conversation_ids[0]), "'labels'", "label -1")


def test_arrays_shared_between_fields_are_refused_when_their_copies_would_not_fit(tmp_path, monkeypatch):
    """One array referenced from many fields pickles small (the memo stores it once) but the loader copies it
    per reference: refused before loading when those copies need more than half the available memory,
    naming the file and the estimate; a structure that fits loads."""
    import pickle

    import numpy as np

    import cmath_mer.data.safe_pickle as sp
    from cmath_mer.data import DataError
    n, refs = int(torch.randint(64_000, 128_000, ())), int(torch.randint(50, 100, ()))
    shared = np.zeros(n, dtype=np.float32)
    obj = {f"conversation {i}": [shared] for i in range(refs)}
    path = tmp_path / "shared.pkl"
    path.write_bytes(pickle.dumps(obj))
    assert path.stat().st_size < 2 * shared.nbytes                    # stored once
    need = refs * shared.nbytes
    monkeypatch.setattr(sp, "available_bytes", lambda: need)           # the copies need more than half of it
    with pytest.raises(DataError, match=r"shared\.pkl: refused: its arrays.*GiB"):
        sp.safe_load_pickle(path)
    monkeypatch.setattr(sp, "available_bytes", lambda: 4 * need)
    assert len(sp.safe_load_pickle(path)) == refs
