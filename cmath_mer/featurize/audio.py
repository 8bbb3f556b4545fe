"""Utterance-level acoustic functionals with openSMILE, from WAV/FLAC files.

eGeMAPSv02 (88 values, the default) or ComParE_2016 (6,373). Every file is mixed down to mono and
resampled to 16 kHz first, so files recorded at other rates give comparable features.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .extra import require

FEATURE_SETS = ("eGeMAPSv02", "ComParE_2016")
SAMPLING_RATE = 16_000


class AudioError(Exception):
    """A file that cannot give features; the caller adds the table, the line and the field."""


def wav_truncation(path: Path) -> str | None:
    """Why a RIFF/WAVE file is cut short, or None. libsndfile reads a truncated WAV without a word (it
    shortens the length), so the header's data size is checked against the file size here."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None                                  # not a plain WAV: libsndfile judges it
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk = f.read(8)
            length = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                have = size - offset - 8
                return None if have >= length else (f"truncated: the header announces {length} bytes of "
                                                     f"samples, the file holds {have}")
            offset += 8 + length + (length & 1)
    return "truncated: no sample data (no 'data' chunk) before the end of the file"


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sampling rate); AudioError when the file is missing, unreadable or empty."""
    sf = require("soundfile", "reading audio files")
    if not path.is_file():
        raise AudioError("no such file")
    reason = wav_truncation(path)
    if reason:
        raise AudioError(reason)
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:                             # libsndfile's errors: format not recognised, ...
        raise AudioError(f"unreadable audio ({err})") from None
    if samples.shape[0] == 0:
        raise AudioError("no samples")
    return samples.mean(axis=1), rate                    # stereo -> mono


class AudioEncoder:
    """audio file -> (dim,) float32 openSMILE functionals; `record` says which features they are."""

    def __init__(self, feature_set: str = "eGeMAPSv02"):
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"audio features {feature_set!r}: choose one of {', '.join(FEATURE_SETS)}")
        opensmile = require("opensmile", "audio features (openSMILE)")
        require("soundfile", "reading audio files")
        self.smile = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, feature_set),
                                     feature_level=opensmile.FeatureLevel.Functionals,
                                     sampling_rate=SAMPLING_RATE, resample=True)
        self.record = {"kind": "opensmile", "name": f"openSMILE {feature_set} functionals",
                       "feature_set": feature_set, "sampling_rate": SAMPLING_RATE,
                       "version": opensmile.__version__, "dim": len(self.smile.feature_names)}

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    @property
    def key(self) -> str:
        return f"audio:opensmile:{self.record['feature_set']}:{self.record['version']}:{SAMPLING_RATE}"

    def encode_file(self, path: Path) -> np.ndarray:
        samples, rate = read_audio(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # "segment too short": the NaN check below says it
            values = self.smile.process_signal(samples, rate).to_numpy(dtype=np.float32).reshape(-1).copy()
        if not np.isfinite(values).all():
            raise AudioError(f"too short or degenerate for openSMILE ({samples.shape[0]} samples at {rate} Hz "
                             f"gave non-finite functionals)")
        return values
