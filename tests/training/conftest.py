"""Fixtures the training tests share."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from cmath_mer.data import make_synthetic, save_dataset

TINY_DIMS = {"text": 12, "audio": 10, "visual": 6}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus file (10 conversations of 3-8 utterances, 4 classes), a new seed per module."""
    path = tmp_path_factory.mktemp("data") / "d.safetensors"
    save_dataset(make_synthetic(None, input_dims=TINY_DIMS, num_classes=4, conversations=10, min_length=3,
                                max_length=8, seed=random.randrange(10_000)), path)
    return path
