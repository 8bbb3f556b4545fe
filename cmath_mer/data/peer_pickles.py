"""Peers' feature pickles: the five tuple layouts, a loader (through safe_pickle.py) and a writer.

Layouts (docs/CMATH.md, "Data people already have"); every per-conversation field is a dict from
conversation id to one entry per utterance:

=============  ==========================================================================================
layout         elements
=============  ==========================================================================================
``12``         ids, speakers, labels, text, roberta2, roberta3, roberta4, audio, visual, sentences,
               train ids, test ids                                   (SDT and GraphSmile, IEMOCAP)
``13``         the 12 plus one more element                          (SDT, MELD)
``14``         ids, speakers, labels, sentiments, text0, text1, text2, text3, audio, visual, sentences,
               train ids, test ids, one more element                  (GraphSmile, MELD)
``9``          ids, speakers, labels, text, audio, visual, sentences, train ids, test ids
                                                                      (MMGCN / M3Net / DialogueGCN, IEMOCAP)
``10``         the 9 plus one more element                           (MMGCN MELD_features_raw1)
``9-novisual`` ids, speakers, labels, text, audio, sentences, train ids, test ids, one more element
                                                                      (DialogueRNN MELD_features_raw: no visual)
=============  ==========================================================================================

The layout is detected from the tuple's length and the types of its elements, never from the file name.
Feature widths are read from the data. Speakers: 'M'/'F' letters (IEMOCAP; M = 0, F = 1), one-hot vectors
(MELD; the vector's length is the number of speakers), other strings (sorted, numbered) or integers.

Splits: conversations in the train ids are 'train', in the test ids 'test'. The "one more element" of the
13/14/10/9-novisual layouts is used as the validation split when it is a collection of conversation ids of
the data that are not test conversations (``extra='auto'``); otherwise it is ignored. Conversations of the
data that no list names are not dropped: by default they become 'valid' (``unassigned='valid'``), or they
raise (``unassigned='error'``) or become 'train' (``unassigned='train'``).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmath_mer.files import atomic_write
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.config import MAX_SPEAKERS, MODALITIES, PRESETS

from .dataset import IGNORE_INDEX, ConversationDataset, DataError
from .safe_pickle import safe_load_pickle
from .validate import validate_dataset

# ------------------------------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class PeerPickleLayout:
    """A peer feature pickle's layout: what each element of its tuple holds (not a table's: table_layouts)."""
    name: str
    fields: tuple[str, ...]              # one name per tuple element
    text_fields: tuple[str, ...]         # the text feature fields, the first is the default
    corpus: str                          # 'iemocap' | 'meld': which preset's class names to assume
    description: str

    def index(self, field: str) -> int:
        return self.fields.index(field)

    @property
    def feature_fields(self) -> dict[str, str]:
        return {m: m for m in ("audio", "visual") if m in self.fields}

    def where(self, field: str) -> str:
        return f"field {field!r} (element {self.index(field)} of the {len(self.fields)}-tuple, layout {self.name})"


_SDT = ("ids", "speakers", "labels", "text", "roberta2", "roberta3", "roberta4", "audio", "visual", "sentences",
        "train ids", "test ids")
_MMGCN = ("ids", "speakers", "labels", "text", "audio", "visual", "sentences", "train ids", "test ids")
PEER_PICKLE_LAYOUTS: dict[str, PeerPickleLayout] = {
    "12": PeerPickleLayout("12", _SDT, ("text", "roberta2", "roberta3", "roberta4"), "iemocap",
                           "SDT / GraphSmile IEMOCAP"),
    "13": PeerPickleLayout("13", _SDT + ("extra",), ("text", "roberta2", "roberta3", "roberta4"), "meld",
                           "SDT MELD"),
    "14": PeerPickleLayout("14", ("ids", "speakers", "labels", "sentiments", "text0", "text1", "text2", "text3",
                                  "audio", "visual", "sentences", "train ids", "test ids", "extra"),
                           ("text0", "text1", "text2", "text3"), "meld", "GraphSmile MELD"),
    "9": PeerPickleLayout("9", _MMGCN, ("text",), "iemocap", "MMGCN / M3Net / DialogueGCN IEMOCAP"),
    "10": PeerPickleLayout("10", _MMGCN + ("extra",), ("text",), "meld", "MMGCN MELD_features_raw1"),
    "9-novisual": PeerPickleLayout("9-novisual", ("ids", "speakers", "labels", "text", "audio", "sentences",
                                                  "train ids", "test ids", "extra"), ("text",), "meld",
                                   "DialogueRNN MELD_features_raw (no visual features)"),
}
_PER_UTTERANCE = ("ids", "speakers", "labels", "sentiments", "sentences")
_ID_LISTS = ("train ids", "test ids")


def _first_utterance(d: dict):
    """The first utterance entry of a per-conversation dict (skipping empty conversations), or None."""
    for v in d.values():
        try:
            if len(v):
                return v[0]
        except TypeError:
            return v
    return None


def _is_id_collection(x) -> bool:
    return isinstance(x, (list, tuple, set, frozenset, np.ndarray)) or type(x).__name__ == "dict_keys"


def _is_text(x) -> bool:
    return isinstance(x, (str, bytes))


def _is_vector(x) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "biuf" and x.ndim >= 1
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                  for v in x[:8])
    return False


def _shape_problem(layout: PeerPickleLayout, obj: tuple) -> str | None:
    """Why `obj` does not fit `layout` (None when it fits)."""
    for i, field in enumerate(layout.fields):
        x = obj[i]
        if field in _ID_LISTS:
            if not _is_id_collection(x):
                return f"element {i} ({field}) is a {type(x).__name__}, expected a list or set of conversation ids"
        elif field == "extra":
            continue
        elif not isinstance(x, dict):
            return f"element {i} ({field}) is a {type(x).__name__}, expected a dict conversation -> utterances"
        elif field in layout.text_fields or field in ("audio", "visual"):
            u = _first_utterance(x)
            if u is not None and not _is_vector(u):
                return (f"element {i} ({field}) holds {type(u).__name__} per utterance, expected a feature "
                        f"vector (numpy array or list of floats)")
        elif field == "sentences":
            u = _first_utterance(x)
            if u is not None and not _is_text(u):
                return f"element {i} ({field}) holds {type(u).__name__} per utterance, expected sentences (str)"
    return None


def detect_layout(obj, source: str = "<pickle>") -> PeerPickleLayout:
    """The PeerPickleLayout of an unpickled object, from its length and element types; DataError if none fits."""
    if not isinstance(obj, (tuple, list)):
        raise DataError(f"{source}: unknown layout: the pickle holds a {type(obj).__name__}, expected a tuple "
                        f"of 9, 10, 12, 13 or 14 elements (see cmath_mer.data.peer_pickles.PEER_PICKLE_LAYOUTS)")
    candidates = [lay for lay in PEER_PICKLE_LAYOUTS.values() if len(lay.fields) == len(obj)]
    if not candidates:
        known = ", ".join(f"{k}: {v.description}" for k, v in PEER_PICKLE_LAYOUTS.items())
        raise DataError(f"{source}: unknown layout: a {len(obj)}-tuple; known peer layouts have 9, 10, 12, 13 "
                        f"or 14 elements ({known})")
    problems = []
    for lay in candidates:
        problem = _shape_problem(lay, obj)
        if problem is None:
            return lay
        problems.append(f"as layout {lay.name} ({lay.description}): {problem}")
    raise DataError(f"{source}: unknown layout: a {len(obj)}-tuple whose element types fit no known layout; "
                    + "; ".join(problems))


# -------------------------------------------------------------------------------------------------- loader

def load_peer_pickle(path: str | Path, *, text_field: int | str = 0, class_names: tuple[str, ...] | None = None,
                     modalities: tuple[str, ...] | None = None, unassigned: str = "valid",
                     extra: str = "auto") -> ConversationDataset:
    """Load a peer feature pickle (any layout of PEER_PICKLE_LAYOUTS) into a packed ConversationDataset.

    text_field: which text feature of the 12/13/14 layouts is 'text': an index (0 = text / text0, the
        default; 1..3 = roberta2..4 / text1..3) or the field's name.
    class_names: the class names (default: the IEMOCAP preset's for 'M'/'F' speakers, the MELD preset's
        for the MELD layouts or 9-dimensional one-hot speakers, else class0..class{max label}).
    modalities: load only these of text, audio, visual (default all the file has).
    unassigned: what happens to conversations that neither the train nor the test ids (nor a validation
        list) name: 'valid' (default), 'train', or 'error'.
    extra: the layouts' last "one more" element: 'auto' (a validation split when it is a collection of the
        data's conversation ids disjoint from the test ids, else ignored), 'valid' (must be one), 'ignore'.
    Labels must be class indices; -100 (IGNORE_INDEX) is kept as "unlabelled". Features become float32.
    Raises DataError naming the file, the conversation and the field for every defect; nothing is dropped.
    """
    path = Path(path)
    src = str(path)
    if unassigned not in ("valid", "train", "error"):
        raise ValueError(f"unassigned={unassigned!r}: choose 'valid', 'train' or 'error'")
    if extra not in ("auto", "valid", "ignore"):
        raise ValueError(f"extra={extra!r}: choose 'auto', 'valid' or 'ignore'")
    if class_names is not None and (isinstance(class_names, (str, bytes)) or not all(
            isinstance(c, str) and c for c in class_names) or len(set(class_names)) != len(tuple(class_names))):
        raise ValueError(f"class_names={class_names!r}: expected a tuple of distinct, non-empty names")
    obj = safe_load_pickle(path)
    layout = detect_layout(obj, src)
    el = dict(zip(layout.fields, obj))

    # which field feeds which modality
    if isinstance(text_field, str):
        if text_field not in layout.text_fields:
            raise DataError(f"{src}: text_field {text_field!r} is not a text field of layout {layout.name} "
                            f"({', '.join(layout.text_fields)})")
        tf = text_field
    else:
        if not 0 <= int(text_field) < len(layout.text_fields):
            raise DataError(f"{src}: text_field={text_field} out of range: layout {layout.name} has "
                            f"{len(layout.text_fields)} text field(s) ({', '.join(layout.text_fields)})")
        tf = layout.text_fields[int(text_field)]
    sources = {"text": tf, **layout.feature_fields}
    if modalities is not None:
        bad = [m for m in modalities if m not in sources]
        if bad:
            raise DataError(f"{src}: modality {bad[0]!r} asked for, but layout {layout.name} has only "
                            f"{', '.join(sources)}")
    mods = tuple(m for m in MODALITIES if m in sources and (modalities is None or m in modalities))

    # conversations: the labels' keys, in their order; every other per-conversation field must have them all
    labels_d = el["labels"]
    keys = list(labels_d.keys())
    used = ["ids", "speakers", "labels", *(sources[m] for m in mods), "sentences"]
    if "sentiments" in layout.fields:
        used.append("sentiments")
    for field in used:
        d = el[field]
        for k in keys:
            if k not in d:
                raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has no entry for it "
                                f"(the labels have one)")
        if len(d) != len(keys):
            k = next(k for k in d if k not in labels_d)
            raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has it but the labels do not")
    ids = [str(k) for k in keys]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{src}: conversation {dup!r}: two conversation keys read as the same id")

    splits = _read_splits(src, layout, el, keys, unassigned, extra)
    names = _speaker_names(src, layout, el["speakers"], keys)

    feats = {m: [] for m in mods}
    dims: dict[str, tuple[int, object]] = {}
    lab_parts, spk_parts, lengths = [], [], []
    for k in keys:
        n = _length(src, layout, "labels", k, labels_d[k])
        if n == 0:
            raise DataError(f"{src}: conversation {k!r}: {layout.where('labels')} is empty (a conversation "
                            f"without utterances)")
        for field in used:
            if field == "labels":
                continue
            nf = _length(src, layout, field, k, el[field][k])
            if nf != n:
                raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has {nf} utterances but "
                                f"field 'labels' has {n}")
        lab_parts.append(_labels(src, layout, k, labels_d[k]))
        spk_parts.append(_speakers(src, layout, k, el["speakers"][k], names))
        for m in mods:
            x = _features(src, layout, sources[m], k, el[sources[m]][k], n)
            if m in dims and dims[m][0] != x.shape[1]:
                raise DataError(f"{src}: conversation {k!r}: {layout.where(sources[m])} has {x.shape[1]}-dim "
                                f"features but conversation {dims[m][1]!r} has {dims[m][0]}")
            dims.setdefault(m, (x.shape[1], k))
            feats[m].append(x)
        lengths.append(n)

    labels = torch.from_numpy(np.concatenate(lab_parts)) if lab_parts else torch.zeros(0, dtype=torch.int64)
    if class_names is None:
        class_names = _guess_class_names(layout, names, labels)
    class_names = tuple(class_names)
    C = len(class_names)
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= C)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        conv = int(np.searchsorted(np.cumsum(lengths), row, side="right"))
        raise DataError(f"{src}: conversation {keys[conv]!r}: {layout.where('labels')} has label "
                        f"{int(labels[row])} at utterance {row - (sum(lengths[:conv]))}, outside 0..{C - 1} "
                        f"({', '.join(class_names)}); if the data has other classes, name them with "
                        f"--class-names a,b,... (CLI) or class_names=(...)")
    cu = cu_seqlens_from(lengths, torch.int64)
    dataset = ConversationDataset(
        features={m: torch.from_numpy(np.concatenate(feats[m])) if feats[m] else torch.zeros(0, 0)
                  for m in mods},
        speakers=torch.from_numpy(np.concatenate(spk_parts)) if spk_parts else torch.zeros(0, dtype=torch.int64),
        labels=labels, cu_seqlens=cu, splits=splits, conversation_ids=ids, class_names=class_names,
        num_speakers=len(names["names"]), source=src, speaker_names=tuple(names["names"]))
    return validate_dataset(dataset, check_finite=False)       # finiteness was checked per conversation


def _length(src, layout, field, k, value) -> int:
    try:
        return len(value)
    except TypeError:
        raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} is a {type(value).__name__}, "
                        f"expected one entry per utterance") from None


def _labels(src, layout, k, value) -> np.ndarray:
    try:
        a = np.asarray(value)
    except Exception:
        a = np.asarray(value, dtype=object)
    if a.ndim != 1 or a.dtype.kind not in "iuf":
        raise DataError(f"{src}: conversation {k!r}: {layout.where('labels')} holds "
                        f"{a.dtype if a.dtype != object else 'non-numeric values'} of shape {a.shape}, expected "
                        f"one integer class index per utterance")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{src}: conversation {k!r}: {layout.where('labels')} has non-integer label "
                            f"{a[i]!r} at utterance {i}")
    return a.astype(np.int64)


def _features(src, layout, field, k, value, n) -> np.ndarray:
    try:
        x = np.asarray(value)
        if x.dtype.kind in "biu":
            raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} holds {x.dtype} values, "
                            f"expected floating-point features (integers or booleans are not features)")
        x = x.astype(np.float32, copy=False)
    except (ValueError, TypeError) as err:
        raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} is not a list of equal-length "
                        f"numeric vectors ({err})") from None
    if x.ndim != 2 or x.shape[0] != n:
        raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has shape {tuple(x.shape)}, "
                        f"expected ({n} utterances, feature width)")
    if x.shape[1] == 0:
        raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has 0-dim features")
    finite = np.isfinite(x)
    if not finite.all():
        u, j = np.argwhere(~finite)[0]
        raise DataError(f"{src}: conversation {k!r}: {layout.where(field)} has a non-finite value "
                        f"({x[u, j]}) at utterance {u}, dimension {j}")
    return x


def _speaker_kind(u) -> str:
    if isinstance(u, (str, bytes)):
        return "name"
    if isinstance(u, (int, np.integer)) and not isinstance(u, bool):
        return "index"
    if isinstance(u, (list, tuple, np.ndarray)) and np.ndim(u) == 1:
        return "onehot"
    if isinstance(u, np.ndarray) and u.ndim == 0 and u.dtype.kind in "iu":
        return "index"
    return "unknown"


def _speaker_names(src, layout, speakers: dict, keys) -> dict:
    """Decide how speakers are written (names, one-hot, indices) and the names of the speaker indices."""
    first = _first_utterance(speakers)
    kind = _speaker_kind(first) if first is not None else "index"
    where = layout.where("speakers")
    if kind == "unknown":
        raise DataError(f"{src}: conversation {keys[0]!r}: {where} holds {type(first).__name__} per utterance, "
                        f"expected 'M'/'F', a speaker name, a one-hot vector or an index")
    if kind == "name":
        seen = set()
        for k in keys:
            for s in speakers[k]:
                if not isinstance(s, (str, bytes)):
                    raise DataError(f"{src}: conversation {k!r}: {where} mixes names with {type(s).__name__}")
                seen.add(s.decode("latin1") if isinstance(s, bytes) else s)
        if len(seen) > MAX_SPEAKERS:
            raise DataError(f"{src}: {where}: {len(seen)} distinct speaker names, more than {MAX_SPEAKERS}")
        names = ["M", "F"] if seen <= {"M", "F"} else sorted(seen)
        return {"kind": kind, "names": names, "index": {n: i for i, n in enumerate(names)}}
    if kind == "onehot":
        width = len(first)
        if width > MAX_SPEAKERS:
            raise DataError(f"{src}: conversation {keys[0]!r}: {where} has one-hot vectors of {width} speakers, "
                            f"more than the {MAX_SPEAKERS} a model can embed")
        return {"kind": kind, "names": [f"speaker{i}" for i in range(width)], "width": width}
    used = set()
    for k in keys:
        a = np.asarray(speakers[k])
        if a.size:
            if a.dtype.kind not in "iu" or a.ndim != 1:
                raise DataError(f"{src}: conversation {k!r}: {where} mixes speaker indices with other values")
            if (a < 0).any():
                raise DataError(f"{src}: conversation {k!r}: {where} has negative speaker index {int(a.min())}")
            used.update(np.unique(a).tolist())
            if len(used) > MAX_SPEAKERS:
                raise DataError(f"{src}: {where}: more than {MAX_SPEAKERS} distinct speakers")
    # renumbered over the corpus: speaker 3,000,000 of a 2-speaker corpus is index 1, not 3,000,001 embeddings
    order = np.array(sorted(used), dtype=np.int64)
    return {"kind": kind, "names": [f"speaker{i}" for i in order.tolist()], "order": order}


def _speakers(src, layout, k, value, names: dict) -> np.ndarray:
    where = layout.where("speakers")
    if names["kind"] == "name":
        out = np.empty(len(value), dtype=np.int64)
        for i, s in enumerate(value):
            s = s.decode("latin1") if isinstance(s, bytes) else s
            out[i] = names["index"][s]
        return out
    if names["kind"] == "onehot":
        try:
            a = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            raise DataError(f"{src}: conversation {k!r}: {where} is not a list of equal-length one-hot "
                            f"vectors") from None
        if a.ndim != 2 or a.shape[1] != names["width"]:
            raise DataError(f"{src}: conversation {k!r}: {where} has one-hot vectors of shape {a.shape[1:]}, "
                            f"expected ({names['width']},) like the first conversation")
        ok = (np.isin(a, (0.0, 1.0)).all(axis=1)) & (a.sum(axis=1) == 1)
        if not ok.all():
            i = int(np.argmin(ok))
            raise DataError(f"{src}: conversation {k!r}: {where} at utterance {i} is not one-hot: "
                            f"{a[i].tolist()}")
        return a.argmax(axis=1).astype(np.int64)
    a = np.asarray(value)
    if a.dtype.kind not in "iu" or (a < 0).any():
        raise DataError(f"{src}: conversation {k!r}: {where} has invalid speaker indices {a.tolist()[:8]}")
    return np.searchsorted(names["order"], a.astype(np.int64)).astype(np.int64)


def _read_splits(src, layout, el, keys, unassigned, extra) -> list[str]:
    known = {}
    for k in keys:
        known[k] = k
        known.setdefault(str(k), k)
    assigned: dict[object, str] = {}

    def resolve(field, ids) -> list:
        out = []
        for c in ids:
            c = c.item() if isinstance(c, np.generic) else c
            if c in known:
                out.append(known[c])
            elif str(c) in known:
                out.append(known[str(c)])
            else:
                raise DataError(f"{src}: conversation {c!r}: named in {layout.where(field)} but absent from "
                                f"the data (no labels for it)")
        return out

    for field, split in (("train ids", "train"), ("test ids", "test")):
        for k in resolve(field, el[field]):
            if assigned.get(k, split) != split:
                raise DataError(f"{src}: conversation {k!r}: in both the train ids and the test ids "
                                f"({layout.where(field)})")
            assigned[k] = split
    if "extra" in layout.fields and extra != "ignore":
        x = el["extra"]
        ok, why = False, ""
        if not _is_id_collection(x) or isinstance(x, np.ndarray) and x.ndim != 1:
            why = f"it is a {type(x).__name__}, not a list of conversation ids"
        else:
            try:
                valid = resolve("extra", x)
                clash = [k for k in valid if assigned.get(k) == "test"]
                ok = not clash
                why = f"conversation {clash[0]!r} of it is a test conversation" if clash else ""
            except (DataError, TypeError) as err:
                why = str(err)
        if ok:
            for k in valid:
                assigned[k] = "valid"          # the official dev split, even when the train ids include it
        elif extra == "valid":
            raise DataError(f"{src}: {layout.where('extra')} cannot be the validation split: {why}")
    out = []
    for k in keys:
        if k not in assigned:
            if unassigned == "error":
                raise DataError(f"{src}: conversation {k!r}: in the data but in none of the train/test id "
                                f"lists (field 'train ids' / 'test ids'); pass unassigned='valid' or 'train' "
                                f"to keep it")
            assigned[k] = unassigned
        out.append(assigned[k])
    return out


def _guess_class_names(layout: PeerPickleLayout, names: dict, labels: torch.Tensor) -> tuple[str, ...]:
    if names["kind"] == "name" and names["names"] == ["M", "F"]:
        return tuple(PRESETS["iemocap"]["class_names"])
    if layout.corpus == "meld" or (names["kind"] == "onehot" and names.get("width") == 9):
        return tuple(PRESETS["meld"]["class_names"])
    if layout.corpus == "iemocap" and names["kind"] != "onehot":
        return tuple(PRESETS["iemocap"]["class_names"])
    top = int(labels[labels != IGNORE_INDEX].max()) if (labels != IGNORE_INDEX).any() else 0
    return tuple(f"class{i}" for i in range(top + 1))


# -------------------------------------------------------------------------------------------------- writer

def write_peer_pickle(dataset: ConversationDataset, path: str | Path, layout: str | int = "12", *,
                      speaker_style: str = "auto", vectors: str = "array", protocol: int = 4) -> Path:
    """Write `dataset` as a peer pickle in one of the layouts (for tests, and to demonstrate the loader).

    layout: '9', '10', '12', '13', '14' or '9-novisual' (text and audio only).
    speaker_style: 'letters' ('M'/'F', needs 2 speakers), 'onehot', 'index', or 'auto' (letters for a
        2-speaker dataset in the IEMOCAP layouts 9/12, one-hot otherwise).
    vectors: 'array' (one float32 numpy array per utterance, as most peers) or 'list' (lists of floats).
    The extra text fields of 12/13/14 (roberta2..4, text1..3) hold the text features times 2, 3, 4, so a
    test can tell which one was read. The validation conversations are the "one more" element of the
    10/13/14/9-novisual layouts; the 9/12 layouts have no place for them, so they are in neither id list
    (and load back as 'valid' with the loader's default unassigned='valid'). Sentences are 'utterance i',
    sentiments (14) are 0. Conversation ids are the dataset's ids (strings).
    """
    lay = PEER_PICKLE_LAYOUTS.get(str(layout))
    if lay is None:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(PEER_PICKLE_LAYOUTS)}")
    need = ["text", "audio"] + (["visual"] if "visual" in lay.fields else [])
    missing = [m for m in need if m not in dataset.features]
    if missing:
        raise ValueError(f"layout {lay.name} needs modality {missing[0]!r}, which the dataset lacks")
    if speaker_style == "auto":
        speaker_style = "letters" if dataset.num_speakers == 2 and lay.corpus == "iemocap" else "onehot"
    if speaker_style == "letters" and dataset.num_speakers != 2:
        raise ValueError("speaker_style='letters' writes 'M'/'F' and needs a 2-speaker dataset")
    if vectors not in ("array", "list"):
        raise ValueError("vectors must be 'array' or 'list'")

    bounds = dataset.cu_seqlens.tolist()
    ids = list(dataset.conversation_ids)
    feats = {m: x.numpy() for m, x in dataset.features.items()}
    spk = dataset.speakers.numpy()
    lab = dataset.labels.numpy()
    eye = np.eye(dataset.num_speakers, dtype=np.float32)

    def per_conv(fn):
        return {c: fn(bounds[i], bounds[i + 1]) for i, c in enumerate(ids)}

    def vecs(x, scale=1.0):
        def fn(a, b):
            rows = x[a:b] * scale if scale != 1.0 else x[a:b]
            return [r.astype(np.float32, copy=True) for r in rows] if vectors == "array" else rows.tolist()
        return per_conv(fn)

    def speakers_of(a, b):
        s = spk[a:b]
        if speaker_style == "letters":
            return ["MF"[int(v)] for v in s]
        if speaker_style == "onehot":
            return [eye[int(v)].tolist() for v in s]
        return [int(v) for v in s]

    fields = {
        "ids": per_conv(lambda a, b: [f"u{j}" for j in range(b - a)]),
        "speakers": per_conv(speakers_of),
        "labels": per_conv(lambda a, b: [int(v) for v in lab[a:b]]),
        "sentiments": per_conv(lambda a, b: [0] * (b - a)),
        "audio": vecs(feats["audio"]),
        "sentences": per_conv(lambda a, b: [f"utterance {j}" for j in range(b - a)]),
        "train ids": [c for c, s in zip(ids, dataset.splits) if s == "train"],
        "test ids": [c for c, s in zip(ids, dataset.splits) if s == "test"],
        "extra": [c for c, s in zip(ids, dataset.splits) if s == "valid"],
    }
    if "visual" in lay.fields:
        fields["visual"] = vecs(feats["visual"])
    for j, name in enumerate(lay.text_fields):
        fields[name] = vecs(feats["text"], float(j + 1))
    obj = tuple(fields[f] for f in lay.fields)
    path = Path(path)

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    atomic_write(path, write)
    return path

