"""Checks of a packed dataset and of its fit to a model config. Every error is a DataError whose message
names the file (dataset.source), the conversation and the field."""
from __future__ import annotations

import torch

from cmath_mer.model.config import MAX_SPEAKERS

from .dataset import IGNORE_INDEX, SPLITS, ConversationDataset, DataError

_FINITE_CHUNK = 1 << 16      # rows per isfinite pass, so a huge corpus needs no (T, d) boolean temporary


def _where(ds: ConversationDataset, row: int) -> tuple[str, int]:
    """(conversation id, utterance index within it) of a packed row."""
    conv = int(torch.searchsorted(ds.cu_seqlens, torch.tensor([row], dtype=ds.cu_seqlens.dtype),
                                  right=True)[0]) - 1
    conv = max(0, min(conv, len(ds.conversation_ids) - 1))
    return ds.conversation_ids[conv], row - int(ds.cu_seqlens[conv])


def validate_dataset(ds: ConversationDataset, *, check_finite: bool = True) -> ConversationDataset:
    """Check the packed layout, returning the dataset unchanged; raises DataError on the first defect.

    Checks: cu_seqlens (B+1 offsets from 0, no empty conversation, ending at T), per-conversation lists
    (splits in SPLITS, unique conversation ids), per-utterance tensors of T rows, float features of width
    >= 1 (finite unless check_finite=False), labels in [0, num_classes) or IGNORE_INDEX, speakers in
    [0, num_speakers), speaker names matching num_speakers.
    """
    src = ds.source
    cu = ds.cu_seqlens
    B = len(ds.conversation_ids)
    if cu.ndim != 1 or cu.numel() != B + 1 or cu.dtype not in (torch.int32, torch.int64):
        raise DataError(f"{src}: field 'cu_seqlens': expected {B + 1} integer offsets for {B} conversations, "
                        f"got shape {tuple(cu.shape)} {cu.dtype}")
    if B and int(cu[0]) != 0:
        raise DataError(f"{src}: field 'cu_seqlens': must start at 0, starts at {int(cu[0])}")
    if B:
        lengths = cu[1:] - cu[:-1]
        if (lengths <= 0).any():
            i = int((lengths <= 0).nonzero()[0, 0])
            what = "is empty (no utterances)" if int(lengths[i]) == 0 else f"has negative length {int(lengths[i])}"
            raise DataError(f"{src}: conversation {ds.conversation_ids[i]!r}: field 'cu_seqlens': the "
                            f"conversation {what}")
    T = int(cu[-1]) if B else 0
    if len(ds.splits) != B:
        raise DataError(f"{src}: field 'splits': {len(ds.splits)} entries for {B} conversations")
    for cid, s in zip(ds.conversation_ids, ds.splits):
        if s not in SPLITS:
            raise DataError(f"{src}: conversation {cid!r}: field 'splits': {s!r} is not one of {SPLITS}")
    if len(set(ds.conversation_ids)) != B:
        seen = set()
        dup = next(c for c in ds.conversation_ids if c in seen or seen.add(c))
        raise DataError(f"{src}: conversation {dup!r}: field 'conversation_ids': the id appears twice")
    if not ds.class_names:
        raise DataError(f"{src}: field 'class_names': no classes")
    names = [str(n).strip() for n in ds.class_names]
    if not all(names):
        raise DataError(f"{src}: field 'class_names': class {names.index('')} has an empty name")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise DataError(f"{src}: field 'class_names': {dup!r} is named twice")
    if ds.num_speakers < 1 and T:
        raise DataError(f"{src}: field 'num_speakers': {ds.num_speakers} speakers for {T} utterances")
    if ds.num_speakers > MAX_SPEAKERS:
        raise DataError(f"{src}: field 'num_speakers': {ds.num_speakers} speakers, more than the {MAX_SPEAKERS} "
                        f"a model can embed")
    if ds.speaker_names is not None and len(ds.speaker_names) != ds.num_speakers:
        raise DataError(f"{src}: field 'speaker_names': {len(ds.speaker_names)} names for "
                        f"num_speakers={ds.num_speakers}")
    if not ds.features:
        raise DataError(f"{src}: field 'features': no modality")

    for name, t in (("labels", ds.labels), ("speakers", ds.speakers)):
        if t.ndim != 1 or t.shape[0] != T:
            raise DataError(f"{src}: field {name!r}: shape {tuple(t.shape)}, expected ({T},) (one per utterance)")
        if t.dtype != torch.int64:
            raise DataError(f"{src}: field {name!r}: dtype {t.dtype}, expected torch.int64")
    C = ds.num_classes
    bad = ((ds.labels < 0) & (ds.labels != IGNORE_INDEX)) | (ds.labels >= C)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        cid, u = _where(ds, row)
        raise DataError(f"{src}: conversation {cid!r}: field 'labels': label {int(ds.labels[row])} at "
                        f"utterance {u} is outside 0..{C - 1} ({', '.join(ds.class_names)})")
    bad = (ds.speakers < 0) | (ds.speakers >= ds.num_speakers)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        cid, u = _where(ds, row)
        raise DataError(f"{src}: conversation {cid!r}: field 'speakers': speaker {int(ds.speakers[row])} at "
                        f"utterance {u} is outside 0..{ds.num_speakers - 1}")

    for m, x in ds.features.items():
        field = f"features.{m}"
        if x.ndim != 2 or x.shape[0] != T:
            raise DataError(f"{src}: field {field!r}: shape {tuple(x.shape)}, expected ({T}, width)")
        if x.shape[1] < 1:
            raise DataError(f"{src}: field {field!r}: 0-dim features")
        if not x.is_floating_point():
            raise DataError(f"{src}: field {field!r}: dtype {x.dtype}, expected floating point")
        if check_finite:
            for r0 in range(0, T, _FINITE_CHUNK):
                ok = torch.isfinite(x[r0:r0 + _FINITE_CHUNK]).all(dim=1)
                if not ok.all():
                    row = r0 + int((~ok).nonzero()[0, 0])
                    col = int((~torch.isfinite(x[row])).nonzero()[0, 0])
                    cid, u = _where(ds, row)
                    raise DataError(f"{src}: conversation {cid!r}: field {field!r}: non-finite value "
                                    f"{float(x[row, col])} at utterance {u}, dimension {col}")
    return ds


def check_compatible(dataset: ConversationDataset, config) -> None:
    """Raise DataError unless `dataset` can feed a model built from `config` (a CMATHConfig): every
    configured modality present with the configured width, the same number of classes, speaker indices
    below config.num_speakers. The message names the file, the modality (or field) and both values."""
    src = dataset.source
    for m in config.modalities:
        want = config.input_dims.get(m)
        if m not in dataset.features:
            raise DataError(f"{src}: field 'features.{m}': the model expects modality {m!r} ({want} dims) but "
                            f"the data has only {', '.join(dataset.modalities)}")
        have = dataset.input_dims[m]
        if want is not None and have != want:
            raise DataError(f"{src}: field 'features.{m}': modality {m!r} has {have}-dim features but the "
                            f"model expects {want} (expected {want}, actual {have})")
    if tuple(dataset.class_names) != tuple(config.class_names):
        raise DataError(f"{src}: field 'class_names': the data's classes are {', '.join(dataset.class_names)} "
                        f"({dataset.num_classes}) but the model's are {', '.join(config.class_names)} "
                        f"({config.num_classes}); labels would be read as other classes (a peer pickle takes "
                        f"--class-names to name its classes)")
    if dataset.speakers.numel():
        top = int(dataset.speakers.max())
        if top >= config.num_speakers:
            cid, u = _where(dataset, int(dataset.speakers.argmax()))
            raise DataError(f"{src}: conversation {cid!r}: field 'speakers': speaker index {top} at utterance "
                            f"{u}, but the model has {config.num_speakers} speaker embeddings "
                            f"(expected < {config.num_speakers}, actual {top})")
