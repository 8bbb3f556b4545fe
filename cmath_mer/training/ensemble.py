"""`predict` and `evaluate` on the folder of `train --seeds`: the seeds' models as one ensemble.

A seeds folder (OUT/seed-N/, one run folder per seed) is the result of the recipe, not any one seed of it;
so its predictions are those of all the seeds together: each utterance's class probabilities are the mean
of the seeds' probabilities (soft voting), and the prediction is the most probable class of that mean. Every
seed must be a finished run of the same model config; one that is not stops the command with the seed-N
folders listed, so a seed is never silently left out. A single seed: --checkpoint OUT/seed-N.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from cmath_mer.errors import CheckpointError
from cmath_mer.model.config import config_to_dict
from cmath_mer.training.evaluate import load_trained

SEED_FOLDER = re.compile(r"seed-(\d+)")


def seed_folders(folder: Path) -> list[Path]:
    """The seed-N run folders of a `train --seeds` folder, by seed; [] for a run folder or anything else."""
    folder = Path(folder)
    if (folder / "best.safetensors").exists() or not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and SEED_FOLDER.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(SEED_FOLDER.fullmatch(p.name).group(1)))


def representative(folder: Path) -> Path:
    """The run folder whose checkpoint speaks for `folder` (its training precision, data and preset): the
    folder itself, or its first seed (the seeds of one --seeds run share them)."""
    seeds = seed_folders(folder)
    return seeds[0] if seeds else Path(folder)


class Ensemble(torch.nn.Module):
    """The seeds' models; forward returns log(mean of their softmax probabilities) as `logits`, so a
    softmax of it, as predict_conversations takes, is the mean probability itself."""

    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.config = models[0].config

    def forward(self, batch, *, with_loss: bool = False, **_):
        probs = torch.stack([m(batch, with_loss=False).logits.float().softmax(-1) for m in self.members]).mean(0)
        return SimpleNamespace(logits=probs.log())


def load_for_prediction(folder: str | Path, device: str = "cpu", log=None):
    """The model of a run folder (train.load_trained), or the Ensemble of a seeds folder's runs."""
    folder = Path(folder)
    seeds = seed_folders(folder)
    if not seeds:
        return load_trained(folder, device)
    names = ", ".join(p.name for p in seeds)
    unfinished = [p.name for p in seeds if not (p / "best.safetensors").exists()]
    if unfinished:
        raise CheckpointError(f"--checkpoint {folder}: a seeds folder ({names}) whose {', '.join(unfinished)} "
                              f"has no best.safetensors (unfinished?); finish it with train --resume, or give one "
                              f"seed's folder, e.g. --checkpoint {seeds[0]}")
    models = [load_trained(p, device) for p in seeds]
    first = config_to_dict(models[0].config)
    for path, model in zip(seeds[1:], models[1:]):
        if config_to_dict(model.config) != first:
            raise CheckpointError(f"--checkpoint {folder}: {path.name} has another model config than "
                                  f"{seeds[0].name}; an ensemble needs one recipe: give one seed's folder")
    (log or (lambda text: print(text, file=sys.stderr)))(
        f"{folder}: an ensemble of {len(seeds)} seeds ({names}): the mean of their class probabilities")
    return Ensemble(models).eval()
