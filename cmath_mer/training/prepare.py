"""What a run is built from: the model config for the data and a preset, the train/valid/test split, class
weights and the inputs' statistics."""
from __future__ import annotations

import random

import torch

from cmath_mer.data import IGNORE_INDEX, ConversationDataset, DataError
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import CMATHConfig, preset


def build_config(data: ConversationDataset, preset_name: str, modalities: tuple[str, ...] | None = None,
                 **overrides) -> CMATHConfig:
    """Preset defaults, then what the data says (dimensions, classes, speakers), then explicit overrides."""
    mods = tuple(modalities) if modalities else data.modalities
    missing = [m for m in mods if m not in data.modalities]
    if missing:
        raise DataError(f"{data.source}: modality {missing[0]!r} was asked for but the data has only "
                        f"{', '.join(data.modalities)} (field features)")
    encoders = data.metadata.get("encoders")
    if encoders is not None:
        encoders = {m: encoders[m] for m in mods if m in encoders}
    return preset(preset_name, modalities=mods, input_dims={m: data.input_dims[m] for m in mods},
                  num_classes=data.num_classes, class_names=data.class_names,
                  num_speakers=max(1, data.num_speakers), encoders=encoders, **overrides)


def make_splits(data: ConversationDataset, valid_fraction: float, seed: int) -> dict[str, list[int]]:
    """train/valid/test conversation indices. Without a validation split in the data (IEMOCAP), a seeded
    `valid_fraction` of the training conversations is held out for model selection."""
    splits = {s: data.indices(s) for s in ("train", "valid", "test")}
    if not splits["valid"] and splits["train"]:
        train = sorted(splits["train"])
        random.Random(seed).shuffle(train)
        n_valid = max(1, round(valid_fraction * len(train))) if len(train) > 1 else 0
        splits["valid"], splits["train"] = sorted(train[:n_valid]), sorted(train[n_valid:])
    if not splits["train"]:
        raise DataError(f"{data.source}: no training conversations (field split)")
    return splits


def inverse_frequency_weights(data: ConversationDataset, conversations: list[int], power: float = 1.0) -> torch.Tensor:
    """w_k = (N / (K * n_k)) ** power over the labelled training utterances (power 1: inverse frequency,
    below 1: tempered, nearer the plain CE that weighted F1 rewards); a class absent from training gets 0."""
    rows = torch.cat([data.labels[a:b] for a, b in ((int(data.cu_seqlens[i]), int(data.cu_seqlens[i + 1]))
                                                     for i in conversations)])
    rows = rows[rows != IGNORE_INDEX]
    counts = torch.bincount(rows, minlength=data.num_classes).float()
    weights = (rows.numel() / (data.num_classes * counts.clamp_min(1))) ** power
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


@torch.no_grad()
def set_input_statistics(model: CMATH, data: ConversationDataset, conversations: list[int]) -> None:
    """Per-feature mean and standard deviation of the training utterances, into the model's buffers."""
    cu = data.cu_seqlens.tolist()
    rows = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in conversations])
    for m in model.config.modalities:
        x = data.features[m][rows].double()
        getattr(model, f"input_mean_{m}").copy_(x.mean(0))
        std = x.std(0, unbiased=False)
        getattr(model, f"input_std_{m}").copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant: 1
