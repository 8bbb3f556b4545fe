"""--deterministic: bitwise-reproducible runs (deterministic algorithms, cuDNN without autotuning, the cuBLAS
workspace setting)."""
from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device):
    """torch.use_deterministic_algorithms for the run (restored afterwards), cuDNN without autotuning, and
    the cuBLAS workspace setting that deterministic cuBLAS needs (set before the first cuBLAS call, so in a
    fresh process; an existing setting is kept)."""
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]
