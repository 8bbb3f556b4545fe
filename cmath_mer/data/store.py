"""The project's own data format (safetensors), `load_dataset` for any input, and the CLI's `convert`/`synth`.

A dataset file holds the packed tensors

    features.text / features.audio / features.visual   (T, d_m)  float32 (or float16/bfloat16 if saved so)
    speakers (T,) int64, labels (T,) int64, cu_seqlens (B+1,) int64, splits (B,) int8 (index into SPLITS)

and, in the safetensors header metadata, ``format`` = "cmath-mer.dataset/1" and ``cmath_mer`` = a JSON
object with class_names, modalities, conversation_ids, num_speakers, speaker_names, splits (the names of
the split codes), source (where the data came from) and sha256 (tensor name -> SHA-256 of its bytes,
checked on load: a flipped bit is an error, not a moved conversation boundary), plus the dataset's
`metadata` entries at the top level of that object (files written before `metadata` existed load with an
empty one). `featurize` writes

    encoders     modality -> {name, version, dim, ...}: what made the features (train copies it into the
                 model config, so predict on raw conversations can featurize the same way)
    inputs       [{path, sha256, split, layout, rows}]: the conversation tables it read
    speaker_map  per conversation, the speaker names of indices 0, 1, ... (order of appearance)
    transcript   {"utterance_ids": [...], "texts": [...]}: per utterance (packed order), for predict's output

Loading copies the tensors into memory (corpora are small): a file that another process rewrites while a
training reads it cannot change the data under it or crash it.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmath_mer.data.memory import check_fits, corpus_bytes
from cmath_mer.files import atomic_write, bytes_needed
from cmath_mer.model.config import MAX_SPEAKERS, PRESETS

from ..errors import UsageError
from .dataset import SPLITS, ConversationDataset, DataError
from .peer_pickles import load_peer_pickle, write_peer_pickle
from .synthetic import make_synthetic
from .validate import validate_dataset

FORMAT = "cmath-mer.dataset/1"
_CORE_KEYS = ("class_names", "modalities", "conversation_ids", "num_speakers", "speaker_names", "splits", "source",
              "sha256")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_dataset(dataset: ConversationDataset, path: str | Path, *, feature_dtype: str = "float32") -> Path:
    """Write `dataset` to a .safetensors file (atomically: a temporary file renamed into place).

    feature_dtype: 'float32' (default), 'float16' or 'bfloat16' for the features (loaded back as float32).
    """
    if feature_dtype not in _DTYPES:
        raise ValueError(f"feature_dtype={feature_dtype!r}: choose one of {', '.join(_DTYPES)}")
    path = Path(path)
    tensors = {f"features.{m}": x.to(_DTYPES[feature_dtype]).contiguous() for m, x in dataset.features.items()}
    tensors["speakers"] = dataset.speakers.to(torch.int64).contiguous()
    tensors["labels"] = dataset.labels.to(torch.int64).contiguous()
    tensors["cu_seqlens"] = dataset.cu_seqlens.to(torch.int64).contiguous()
    tensors["splits"] = torch.tensor([SPLITS.index(s) for s in dataset.splits], dtype=torch.int8)
    meta = {
        "sha256": {k: _digest(t) for k, t in sorted(tensors.items())},
        "class_names": list(dataset.class_names),
        "modalities": list(dataset.modalities),
        "conversation_ids": list(dataset.conversation_ids),
        "num_speakers": int(dataset.num_speakers),
        "speaker_names": list(dataset.speaker_names) if dataset.speaker_names is not None else None,
        "splits": list(SPLITS),
        "source": dataset.source,
    }
    clash = [k for k in dataset.metadata if k in _CORE_KEYS]
    if clash:
        raise ValueError(f"dataset metadata key {clash[0]!r} would overwrite a field of the format")
    meta.update(dataset.metadata)

    def write(tmp):
        save_file(tensors, tmp, metadata={"format": FORMAT, "cmath_mer": json.dumps(meta)})
        _sort_header_metadata(tmp)
    atomic_write(path, write, needed=bytes_needed(tensors, meta))
    return path


def _digest(t: torch.Tensor) -> str:
    t = t.contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()


def _name_list(src: str, key: str, value, *, allow_none: bool = False):
    """A metadata list of names (a plain string would split into characters)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DataError(f"{src}: field 'metadata.{key}': expected a list of names, got {value!r:.80}")
    return value


def _sort_header_metadata(path) -> None:
    """safetensors writes its metadata map in hash order, which changes from process to process; put the
    keys in sorted order (in place: the header keeps its length) so the same dataset gives the same bytes."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= n:                  # it is the same length; safetensors pads with spaces
            f.seek(8)
            f.write(canonical.ljust(n, b" "))


def load_safetensors(path: str | Path, *, modalities: tuple[str, ...] | None = None,
                     validate: bool = True) -> ConversationDataset:
    """Read a dataset written by save_dataset. modalities: load only these. validate: run
    validate_dataset (including the finiteness of every feature; one pass over the data)."""
    path = Path(path)
    src = str(path)
    try:
        f = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise DataError(f"{src}: no such file") from None
    except Exception as err:
        raise DataError(f"{src}: not a readable safetensors file ({err})") from err
    with f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT or "cmath_mer" not in header:
            raise DataError(f"{src}: field 'metadata': a safetensors file but not a cmath-mer dataset "
                            f"(format {header.get('format')!r}, expected {FORMAT!r}); a model checkpoint?")
        try:
            meta = json.loads(header["cmath_mer"])
        except json.JSONDecodeError as err:
            raise DataError(f"{src}: field 'metadata': unreadable JSON ({err})") from None
        except RecursionError:
            raise DataError(f"{src}: field 'metadata': the JSON is nested too deeply") from None
        if not isinstance(meta, dict):
            raise DataError(f"{src}: field 'metadata': expected a JSON object")
        for key in ("class_names", "modalities", "conversation_ids", "num_speakers", "splits"):
            if key not in meta:
                raise DataError(f"{src}: field 'metadata.{key}' is missing")
        for key in ("class_names", "modalities", "conversation_ids", "splits"):
            _name_list(src, key, meta[key])
        _name_list(src, "speaker_names", meta.get("speaker_names"), allow_none=True)
        num_speakers = meta["num_speakers"]
        if isinstance(num_speakers, bool) or not isinstance(num_speakers, int):
            raise DataError(f"{src}: field 'metadata.num_speakers': expected an integer, got {num_speakers!r}")
        if num_speakers > MAX_SPEAKERS:
            raise DataError(f"{src}: field 'metadata.num_speakers': {num_speakers} speakers, more than the "
                            f"{MAX_SPEAKERS} a model can embed")
        digests = meta.get("sha256")
        if digests is not None and not isinstance(digests, dict):
            raise DataError(f"{src}: field 'metadata.sha256': expected an object tensor -> hash")

        def get(key: str) -> torch.Tensor:
            t = f.get_tensor(key).clone()          # into memory: the file may change after this
            if digests is not None and key in digests and _digest(t) != digests[key]:
                raise DataError(f"{src}: field {key!r}: the tensor's content does not match the checksum "
                                f"stored when the file was written (a corrupted or altered file)")
            return t

        names = set(f.keys())
        mods = list(meta["modalities"])
        if modalities is not None:
            bad = [m for m in modalities if m not in mods]
            if bad:
                raise DataError(f"{src}: field 'features.{bad[0]}': modality asked for, but the file has only "
                                f"{', '.join(mods)}")
            mods = [m for m in mods if m in modalities]
        for key in ["speakers", "labels", "cu_seqlens", "splits", *(f"features.{m}" for m in mods)]:
            if key not in names:
                raise DataError(f"{src}: field {key!r}: tensor missing from the file")
        features = {}
        for m in mods:
            x = get(f"features.{m}")
            if not x.is_floating_point():
                raise DataError(f"{src}: field 'features.{m}': dtype {x.dtype}, expected floating point "
                                f"(float32, float16 or bfloat16 features)")
            features[m] = x if x.dtype == torch.float32 else x.float()
        split_codes = get("splits")
        if split_codes.ndim != 1 or split_codes.is_floating_point() or split_codes.dtype == torch.bool:
            raise DataError(f"{src}: field 'splits': expected one integer split code per conversation, got "
                            f"shape {tuple(split_codes.shape)} {split_codes.dtype}")
        codes = split_codes.tolist()
        legend = list(meta["splits"])
        ids = [str(c) for c in meta["conversation_ids"]]
        if len(codes) != len(ids):
            raise DataError(f"{src}: field 'splits': {len(codes)} split codes for {len(ids)} conversations")
        splits = []
        for cid, c in zip(ids, codes):
            if not 0 <= c < len(legend):
                raise DataError(f"{src}: conversation {cid!r}: field 'splits': unknown split code {c}")
            splits.append(legend[c])
        ds = ConversationDataset(
            features=features, speakers=get("speakers"), labels=get("labels"),
            cu_seqlens=get("cu_seqlens"), splits=splits, conversation_ids=ids,
            class_names=tuple(str(c) for c in meta["class_names"]), num_speakers=num_speakers, source=src,
            speaker_names=tuple(meta["speaker_names"]) if meta.get("speaker_names") is not None else None,
            metadata={k: v for k, v in meta.items() if k not in _CORE_KEYS})
    return validate_dataset(ds, check_finite=True) if validate else ds


PICKLE_SUFFIXES = (".pkl", ".pickle", ".p", ".pk")


def file_format(path: str | Path) -> str:
    """'safetensors', 'pickle' or 'unknown', from the file's first bytes (then its suffix)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" or path.suffix.lower() in PICKLE_SUFFIXES:
        return "pickle"
    if head[:1] in (b"(", b"]", b"}", b"c") and path.suffix.lower() not in (".safetensors",):
        return "pickle"                                              # protocol 0/1 pickles
    return "unknown"


def load_dataset(path: str | Path, **options) -> ConversationDataset:
    """Load a dataset from a .safetensors file (save_dataset) or a peer pickle (any layout of
    peer_pickles.PEER_PICKLE_LAYOUTS), told apart by content, then suffix. `path` may also be 'synthetic' or
    'synthetic:<preset>' (when no such file exists) for the embedded synthetic corpus.

    Options for safetensors: modalities, validate. Options for pickles: text_field, class_names, modalities,
    unassigned, extra (see load_peer_pickle). Options for synthetic: those of make_synthetic.
    """
    p = Path(path)
    if not p.exists():
        if str(path) == "synthetic" or str(path).startswith("synthetic:"):
            name = str(path).partition(":")[2] or "iemocap"
            return make_synthetic(preset=name, **options)
        raise DataError(f"{path}: no such file")
    if p.is_dir():
        raise DataError(f"{path}: is a folder, expected a .safetensors or .pkl file")
    if p.suffix.lower() in (".csv", ".jsonl", ".ndjson"):     # a CSV starting with 'c' looks like a pickle
        raise DataError(f"{path}: a conversation table, not features; make a dataset file from it with "
                        f"`cmath-mer featurize {path} --out DATA.safetensors` (predict takes tables directly)")
    kind = file_format(p)
    if kind == "safetensors":
        return load_safetensors(p, **options)
    if kind == "pickle":
        return load_peer_pickle(p, **options)
    raise DataError(f"{path}: unrecognised data file: neither safetensors nor a pickle (by content and suffix)")


def convert(in_path: str | Path, out_path: str | Path, **options) -> ConversationDataset:
    """`cmath-mer convert IN OUT`: read a peer pickle (or a dataset file) and write it as safetensors.

    Options (all optional):
      text_field: 0..3 or a field name: which text feature of a 12/13/14-tuple becomes 'text' (default 0,
          the first: text / text0).
      class_names: tuple of class names (default: inferred, IEMOCAP or MELD preset names).
      modalities: subset of ('text', 'audio', 'visual') to keep (default all in the file).
      unassigned: 'valid' (default) | 'train' | 'error': conversations named by no split list.
      extra: 'auto' (default) | 'valid' | 'ignore': the layouts' last element as validation split.
      feature_dtype: 'float32' (default) | 'float16' | 'bfloat16' in the written file.
    Returns the dataset that was written. Raises DataError on bad input (nothing is written then).
    """
    feature_dtype = options.pop("feature_dtype", "float32")
    if Path(out_path).suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"output {out_path}: convert writes the project's safetensors format, not a pickle; "
                         f"name the output .safetensors")
    dataset = load_dataset(in_path, **options)
    save_dataset(dataset, out_path, feature_dtype=feature_dtype)
    return dataset


def _check_synthetic_fits(options: dict) -> None:
    """Refuse (UsageError with the estimate) a synthetic corpus larger than the memory available."""
    name = options.get("preset", "iemocap")
    dims = options.get("input_dims") or (PRESETS[name]["input_dims"] if name in PRESETS else {})
    conversations, longest = options.get("conversations"), options.get("max_length")
    if conversations is not None and longest is not None:
        check_fits(corpus_bytes(conversations, longest, dims), f"a corpus of {conversations:,} conversations of "
                   f"up to {longest:,} utterances ({sum(dims.values()):,} feature dims)",
                   "--conversations / --max-length")


def synth(out_path: str | Path, **options) -> ConversationDataset:
    """`cmath-mer synth OUT`: write a synthetic corpus (see synthetic.make_synthetic for the model).

    The format follows the suffix of out_path: .safetensors (default for any other suffix) or .pkl (a peer
    pickle; option layout: '9', '10', '12' (default), '13', '14', '9-novisual'; speaker_style as in
    write_peer_pickle).
    Options of make_synthetic (all optional): preset ('iemocap' default | 'meld' | None), conversations,
    min_length, max_length, lengths, input_dims, modalities, num_classes, class_names, num_speakers,
    class_prior, signal (modality -> strength; defaults text 2.0, audio 1.25, visual 0.75), inertia (0.8),
    context_only (0.15), missing_signal (0.1), speaker_shift (0.5), turn_switch (0.7), split_fractions
    ((0.7, 0.1, 0.2)), seed (0), world_seed (0), threads.
    Also feature_dtype for .safetensors output. Returns the dataset that was written.
    """
    layout = options.pop("layout", "12")
    speaker_style = options.pop("speaker_style", "auto")
    feature_dtype = options.pop("feature_dtype", "float32")
    _check_synthetic_fits(options)
    dataset = make_synthetic(**options)
    out = Path(out_path)
    if out.suffix.lower() in (".pkl", ".pickle"):
        write_peer_pickle(dataset, out, layout, speaker_style=speaker_style)
    else:
        save_dataset(dataset, out, feature_dtype=feature_dtype)
    return dataset
