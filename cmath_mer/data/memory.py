"""Memory a command is about to allocate, estimated before it allocates: a request that cannot fit is
refused with the estimate (one line naming the option), instead of an allocation error deep inside torch."""
from __future__ import annotations

import os

import torch

from cmath_mer.errors import UsageError
from cmath_mer.model.cmath import CMATH

# per parameter while training: the fp32 weight, its gradient and AdamW's two moments
TRAINING_BYTES_PER_PARAMETER = 16


def available_bytes() -> int:
    """Memory the process may still take: MemAvailable (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(needed: int, what: str, option: str, device: str = "cpu") -> None:
    """UsageError naming `option` when `needed` bytes exceed what the device (the host's memory, or a CUDA
    card's) has available."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        have, where = torch.cuda.mem_get_info(dev)[0], f"free on {device}"
    else:
        have, where = available_bytes(), "available"
    if needed > have:
        raise UsageError(f"{option}: {what} needs about {gib(needed)} of memory, more than the {gib(have)} "
                         f"{where}; ask for less")


def corpus_bytes(conversations: int, max_length: int, dims: dict[str, int]) -> int:
    """Upper bound of a synthetic corpus's features (float32) and per-utterance tensors (int64)."""
    utterances = conversations * max_length
    return utterances * (4 * sum(dims.values()) + 3 * 8)


def model_parameters(config) -> int:
    """Parameters of CMATH(config), counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in CMATH(config).parameters())


def check_model_fits(config, device: str = "cpu", option: str = "--set") -> None:
    """The weights, gradients and optimizer moments of the model in training (activations come on top)."""
    n = model_parameters(config)
    check_fits(n * TRAINING_BYTES_PER_PARAMETER, f"a model of {n:,} parameters (d_model {config.d_model}, "
               f"d_hidden {config.d_hidden}, {config.n_layers} layers) in training", option, device)
