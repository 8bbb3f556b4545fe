"""Feature cache beside the output (`<out>.cache/`): one safetensors file per encoder, each vector keyed
by sha256(encoder key, content) (the text, or the audio file's bytes) and checked on reading against the
SHA-256 of its own bytes stored beside it (a damaged vector is computed again). A re-run encodes only rows
that are new or changed; a vector read back is the very one computed before, so the output bytes repeat.
Delete the folder to drop the cache; nothing else refers to it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmath_mer.files import SAFETENSORS_TMP, TMP_SUFFIX, atomic_write, remove_temporary
from cmath_mer.training.checkpoint import read_metadata

from ..paths import path_component


def content_key(encoder_key: str, content: bytes) -> bytes:
    return hashlib.sha256(encoder_key.encode() + b"\0" + content).digest()


def vector_digest(v: torch.Tensor) -> bytes:
    return hashlib.sha256(v.float().contiguous().numpy().tobytes()).digest()


class FeatureCache:
    """folder None: a cache that holds nothing and writes nothing."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None

    def _file(self, encoder_key: str) -> Path:
        name = f"{hashlib.sha256(encoder_key.encode()).hexdigest()[:16]}.safetensors"
        return self.folder / path_component(name, "feature cache file")

    def load(self, encoder_key: str) -> dict[bytes, torch.Tensor]:
        if self.folder is None or not self._file(encoder_key).exists():
            return {}
        try:
            with safe_open(str(self._file(encoder_key)), framework="pt") as f:
                if (f.metadata() or {}).get("encoder") != encoder_key:
                    return {}
                keys, vectors = f.get_tensor("keys"), f.get_tensor("vectors")
                digests = f.get_tensor("sha256")
        except Exception:                       # a damaged cache is only a slower run, never an error
            return {}
        # a vector whose bytes are not the ones stored (a damaged file) is computed again
        return {bytes(k.tolist()): v for k, v, d in zip(keys, vectors, digests)
                if vector_digest(v) == bytes(d.tolist())}

    def save(self, encoder_key: str, entries: dict[bytes, torch.Tensor]) -> None:
        """Merge `entries` into the encoder's file (written atomically)."""
        if self.folder is None or not entries:
            return
        merged = {**self.load(encoder_key), **entries}
        order = sorted(merged)
        keys = torch.tensor([list(k) for k in order], dtype=torch.uint8)
        vectors = torch.stack([merged[k].float() for k in order]).contiguous()
        digests = torch.tensor([list(vector_digest(v)) for v in vectors], dtype=torch.uint8)
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self.folder.iterdir():            # the folder is the cache's: what a killed write left
            if p.name.endswith(TMP_SUFFIX) and p.name.startswith(".") or SAFETENSORS_TMP.fullmatch(p.name):
                remove_temporary(p)
        atomic_write(self._file(encoder_key),
                     lambda tmp: save_file({"keys": keys, "vectors": vectors, "sha256": digests}, tmp,
                                           metadata={"encoder": encoder_key}))


def training_cache(run_folder: str | Path) -> Path | None:
    """The featurize cache beside the dataset a run trained on (`<data>.cache/`, as its run info records
    the data), None when the run was not trained on a file or the cache is not there."""
    run = read_metadata(Path(run_folder) / "best.safetensors")["state"].get("run") or {}
    for data in (run.get("data_path"), run.get("data")):
        if data:
            folder = Path(data).with_name(Path(data).name + ".cache")
            if folder.is_dir():
                return folder
    return None
