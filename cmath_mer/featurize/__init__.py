"""`cmath-mer featurize`: conversation tables (transcripts, audio files, .npy visual vectors) -> a packed
ConversationDataset in the project's safetensors format, with what made the features in its metadata.

    tables.py  CSV/JSONL layouts -> validated conversations      text.py   sentence embeddings
    audio.py   openSMILE functionals                              cache.py  per-row cache by content hash
    finetune.py  --finetune: the text encoder fitted to the train split's labels first

Everything is checked before anything is encoded, and the output is written atomically: on an error
there is no output (and no cache update).
"""
from __future__ import annotations

import glob
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cmath_mer.files import TMP_SUFFIX, remove_temporary
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.config import MODALITIES

from ..data import ConversationDataset, DataError, save_dataset, validate_dataset
from .audio import AudioEncoder, AudioError
from .cache import FeatureCache, content_key
from .extra import INSTALL, MissingExtraError
from .finetune import FinetuneOptions, encoder_folder, finetuned_encoder, mark_valid
from .tables import Corpus, Utterance, label_indices, read_tables, speaker_indices
from .text import DEFAULT_MODEL, TextEncoder, load_text_encoder

__all__ = ["featurize", "featurize_for_model", "cache_folder", "encoder_folder", "FinetuneOptions", "INSTALL",
           "MissingExtraError", "Corpus"]


def cache_folder(out: str | Path) -> Path:
    """Where featurize keeps its cache for an output file: beside it, `<out>.cache/`."""
    out = Path(out)
    return out.with_name(out.name + ".cache")


def _text_features(corpus: Corpus, encoder: TextEncoder, cache: FeatureCache, progress: bool,
                   fresh: dict, log=print) -> torch.Tensor:
    """(T, d) embeddings; each distinct text is encoded once, and only if the cache lacks it. Says what it
    encodes, and how fast it went (the encoder's own bar, with progress, shows the time left)."""
    texts = [u.text for u in corpus.utterances]
    keys = [content_key(encoder.key, t.encode()) for t in texts]
    known = cache.load(encoder.key)
    todo = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in known))
    distinct = len(set(keys))
    log(f"featurize: text of {len(texts):,} utterances ({distinct:,} distinct): {len(todo):,} to encode with "
        f"{encoder.record.get('name')} ({encoder.dim}-d), {distinct - len(todo):,} from the cache")
    if todo:
        t0 = time.perf_counter()
        vectors = encoder.encode(todo, progress=progress)
        seconds = time.perf_counter() - t0
        log(f"featurize: encoded {len(todo):,} texts in {seconds:.1f} s ({len(todo) / max(seconds, 1e-9):,.0f} per s)")
        new = {content_key(encoder.key, t.encode()): v for t, v in zip(todo, vectors)}
        known.update(new)
        fresh[encoder.key] = new
    return torch.stack([known[k] for k in keys]) if keys else torch.zeros(0, encoder.dim)


def _audio_features(corpus: Corpus, encoder: AudioEncoder, cache: FeatureCache, missing: str, progress: bool,
                    fresh: dict, log) -> torch.Tensor:
    """(T, d) openSMILE functionals. A missing or unreadable file stops with the table, the line and the
    path, unless missing == 'zero' (a zero vector, counted and reported)."""
    rows = corpus.utterances
    problems: list[tuple[Utterance, str]] = []
    known = cache.load(encoder.key)
    out = torch.zeros(len(rows), encoder.dim)
    new = {}
    for i, u in enumerate(tqdm(rows, desc="audio", unit="utt", disable=not progress)):
        try:
            if u.audio is None:
                raise AudioError("no audio file given (empty cell or no audio column in this table)")
            if not u.audio.is_file():
                raise AudioError("no such file")
            try:
                key = content_key(encoder.key, u.audio.read_bytes())
            except OSError as err:
                raise AudioError(f"cannot read ({err.strerror})") from None
            if key not in known:
                known[key] = new[key] = torch.from_numpy(encoder.encode_file(u.audio))
            out[i] = known[key]
        except AudioError as err:
            if missing != "zero":
                raise DataError(f"{u.file}: line {u.line}: field 'audio': {str(u.audio or '')!r}: {err} "
                                f"(--missing-audio zero uses a zero vector instead)") from None
            problems.append((u, str(err)))
    if new:
        fresh[encoder.key] = new
    if problems:
        u, why = problems[0]
        log(f"featurize: {len(problems)} of {len(rows)} utterances have no usable audio and got a zero vector "
            f"(--missing-audio zero); the first: {u.file} line {u.line}, {str(u.audio or '')!r}: {why}")
    return out


def _visual_features(corpus: Corpus) -> tuple[torch.Tensor, dict]:
    """(T, d) vectors read from per-utterance .npy files (visual features are not extracted here)."""
    vectors, dim = [], None
    for u in corpus.utterances:
        where = f"{u.file}: line {u.line}: field 'visual': {str(u.visual or '')!r}"
        if u.visual is None:
            raise DataError(f"{where}: no .npy file given")
        try:
            x = np.load(u.visual, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{where}: no such file") from None
        except (ValueError, OSError) as err:
            raise DataError(f"{where}: not a readable .npy array ({err})") from None
        if x.dtype.kind not in "fiu" or x.size == 0 or x.squeeze().ndim > 1:
            raise DataError(f"{where}: expected one numeric vector, got shape {x.shape} {x.dtype}")
        x = x.reshape(-1).astype(np.float32)
        if dim is not None and x.shape[0] != dim:
            raise DataError(f"{where}: {x.shape[0]} values, the earlier rows have {dim}")
        if not np.isfinite(x).all():
            raise DataError(f"{where}: non-finite values")
        dim = x.shape[0]
        vectors.append(torch.from_numpy(x))
    return torch.stack(vectors), {"kind": "npy", "name": "per-utterance .npy vectors", "dim": int(dim)}


def _modalities(corpus: Corpus, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """text always; audio / visual when a table has that column (or when `wanted` asks: then every table
    must have it)."""
    if wanted is None:
        return tuple(m for m in MODALITIES if m == "text" or any(m in t.has for t in corpus.tables))
    for m in wanted:
        if m != "text":
            for t in corpus.tables:
                if m not in t.has:
                    raise DataError(f"{t.name}: line 1: field {m!r}: the model needs {m} features but the table "
                                    f"has no {m} column (map one with --columns {m}=NAME)")
    return tuple(m for m in MODALITIES if m in wanted)


def _build(corpus: Corpus, modalities: tuple[str, ...], text_encoder: TextEncoder | None,
           audio_encoder: AudioEncoder | None, *, cache: FeatureCache, missing_audio: str, progress: bool,
           source: str, log) -> tuple[ConversationDataset, dict[str, dict]]:
    """The dataset, and the vectors computed in this run per encoder key (for the cache)."""
    fresh: dict[str, dict] = {}
    features, encoders = {}, {}
    if "text" in modalities:
        features["text"] = _text_features(corpus, text_encoder, cache, progress, fresh, log)
        encoders["text"] = dict(text_encoder.record)
    if "audio" in modalities:
        features["audio"] = _audio_features(corpus, audio_encoder, cache, missing_audio, progress, fresh, log)
        encoders["audio"] = dict(audio_encoder.record)
    if "visual" in modalities:
        features["visual"], encoders["visual"] = _visual_features(corpus)

    speakers, speaker_map = [], []
    for conv in corpus.conversations:
        idx, names = speaker_indices(conv)
        speakers += idx
        speaker_map.append(names)
    utterances = corpus.utterances
    dataset = ConversationDataset(
        features=features, speakers=torch.tensor(speakers, dtype=torch.int64),
        labels=torch.tensor(label_indices(corpus), dtype=torch.int64),
        cu_seqlens=cu_seqlens_from([len(c) for c in corpus.conversations], torch.int64),
        splits=[c[0].split for c in corpus.conversations],
        conversation_ids=[c[0].conversation for c in corpus.conversations],
        class_names=corpus.class_names, num_speakers=max(len(n) for n in speaker_map), source=source,
        metadata={
            "encoders": encoders,
            "inputs": [{"path": t.name, "sha256": t.sha256, "split": t.split, "layout": t.layout,
                        "rows": len(t.utterances)} for t in corpus.tables],
            "speaker_map": speaker_map,
            "transcript": {"utterance_ids": [u.utterance_id for u in utterances],
                           "texts": [u.text for u in utterances]},
        })
    return validate_dataset(dataset), fresh


def featurize(tables: list[str], out: str | Path | None = None, *, layout: str = "auto",
              columns: dict[str, str] | None = None, split: str | None = None,
              class_names: tuple[str, ...] | None = None, media_root: str | Path | None = None,
              text_encoder: str | TextEncoder | None = None, audio_features: str = "eGeMAPSv02",
              missing_audio: str = "error", cache: bool | str | Path = True, device: str | None = None,
              batch_size: int = 64, finetune: FinetuneOptions | None = None, progress: bool = True,
              log=print) -> ConversationDataset:
    """Featurize conversation tables ('FILE' or 'FILE:split', see tables.py) into one dataset, written to
    `out` (.safetensors, atomically) when given.

    text_encoder: None (the embedded all-MiniLM-L6-v2), a local model folder, or a TextEncoder.
    audio_features: 'eGeMAPSv02' | 'ComParE_2016' (used when a table has an audio column).
    missing_audio: 'error' (default) | 'zero'. cache: True (`<out>.cache/`, see cache.py), False, or a folder.
    finetune: fine-tune the text encoder on the train split first (finetune.py; needs `out`, beside which
    the fine-tuned encoder is kept).
    """
    if missing_audio not in ("error", "zero"):
        raise ValueError(f"missing_audio={missing_audio!r}: choose 'error' or 'zero'")
    corpus = read_tables(list(tables), layout=layout, columns=columns, split=split, class_names=class_names,
                         media_root=media_root)
    modalities = _modalities(corpus, None)
    audio_encoder = AudioEncoder(audio_features) if "audio" in modalities else None
    if not progress:
        _quiet_model_loading()
    if finetune is not None:
        text_encoder = _finetuned(corpus, text_encoder, out, finetune, device, progress, log)
    elif not isinstance(text_encoder, TextEncoder):
        text_encoder = load_text_encoder(text_encoder, device)
    text_encoder.batch_size = batch_size
    folder = (cache_folder(out) if out is not None else None) if cache is True else (cache or None)
    source = ", ".join(t.name + (f":{t.split}" if t.split else "") for t in corpus.tables)
    cache = FeatureCache(folder)
    dataset, fresh = _build(corpus, modalities, text_encoder, audio_encoder, cache=cache,
                            missing_audio=missing_audio, progress=progress, source=source, log=log)
    if out is not None:
        remove_temporaries_of(Path(out))
        save_dataset(dataset, out)
        dataset.source = str(out)
    for key, entries in fresh.items():            # the cache learns only from a run that succeeded
        cache.save(key, entries)
    return dataset


def _finetuned(corpus: Corpus, base, out, options: FinetuneOptions, device, progress, log) -> TextEncoder:
    if out is None:
        raise ValueError("--finetune needs --out: the fine-tuned encoder is saved beside it")
    if isinstance(base, TextEncoder):
        raise ValueError("--finetune fine-tunes a model folder; give its path, not a loaded encoder")
    encoder, valid = finetuned_encoder(corpus, base, encoder_folder(out), options, device=device,
                                       progress=progress, log=log)
    mark_valid(corpus, valid)
    return encoder


def remove_temporaries_of(out: Path) -> None:
    """What a killed earlier write of `out` left beside it (atomic_write's `.NAME.*.tmp`, named after `out`
    alone: nothing else of the folder is touched)."""
    if out.parent.is_dir():
        for p in out.parent.glob(f".{glob.escape(out.name)}.*{TMP_SUFFIX}"):
            remove_temporary(p)


def _quiet_model_loading() -> None:
    """--no-progress: transformers' own 'Loading weights' bar too."""
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _same_encoder(modality: str, recorded: dict, actual: dict, checkpoint: str) -> None:
    keys = ("dim", "fingerprint") if modality == "text" else ("dim", "feature_set", "sampling_rate")
    diff = [k for k in keys if recorded.get(k) != actual.get(k)]
    if diff:
        raise DataError(f"{checkpoint}: encoder mismatch for {modality}: the model was trained on features of "
                        f"{recorded.get('name')} ({', '.join(f'{k} {recorded.get(k)}' for k in keys)}) but these "
                        f"come from {actual.get('name')} ({', '.join(f'{k} {actual.get(k)}' for k in keys)})")


def featurize_for_model(table: str, config, *, checkpoint: str = "the checkpoint",
                        text_encoder: str | TextEncoder | None = None, missing_audio: str = "error",
                        device: str | None = None, progress: bool = True, log=print,
                        cache: str | Path | None = None, **table_options) -> tuple[ConversationDataset, Corpus]:
    """Featurize one table the way the model's training data was (config.encoders): the same text model
    (checked by its weights' fingerprint and width), the same audio features. text_encoder overrides the
    recorded model folder (e.g. on another machine); a different model is an error. table_options: those of
    read_table (layout, columns, media_root). cache: a featurize cache folder (the training data's) that
    vectors are read from, so texts featurized for training are not encoded again; it is never written."""
    encoders = config.encoders or {}
    missing = [m for m in config.modalities if m not in encoders]
    if missing:
        raise DataError(f"{checkpoint}: the model's config records no encoder for {missing[0]} (it was trained "
                        f"on data not made by featurize); featurize the table yourself and pass the .safetensors")
    corpus = read_tables([table], class_names=tuple(config.class_names), **table_options)
    modalities = _modalities(corpus, tuple(config.modalities))
    text = audio = None
    if not progress:
        _quiet_model_loading()
    if "text" in modalities:
        rec = encoders["text"]
        if not isinstance(text_encoder, TextEncoder):
            if text_encoder is None and rec.get("model") != DEFAULT_MODEL:
                if not Path(rec.get("model", "")).is_dir():
                    raise DataError(f"{checkpoint}: the model's text encoder {rec.get('model')!r} is not on this "
                                    f"machine; give its folder with --text-encoder")
                text_encoder = rec["model"]
            text_encoder = load_text_encoder(text_encoder, device)
        _same_encoder("text", rec, text_encoder.record, checkpoint)
        text = text_encoder
    if "audio" in modalities:
        audio = AudioEncoder(encoders["audio"].get("feature_set", "eGeMAPSv02"))
        _same_encoder("audio", encoders["audio"], audio.record, checkpoint)
    dataset, _ = _build(corpus, modalities, text, audio, cache=FeatureCache(cache),
                        missing_audio=missing_audio, progress=progress, source=corpus.tables[0].name, log=log)
    return dataset, corpus
