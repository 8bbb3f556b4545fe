"""Where the Triton path hands a call to the PyTorch reference, and saying so once per process.

On a GPU the dot kernels (attention, reconstruction) take fp16/bf16, and fp32 only with TF32 allowed; other
calls run the reference (cuBLAS / SDPA), which is correct but not the kernels a user asked for. That used to
happen silently: a user running fp32 without TF32 measured the reference and took it for the kernels. Each
(op, reason) is now reported once, as a ReferenceFallbackWarning (Python `warnings`), the first time it
happens in the process.
"""
from __future__ import annotations

import warnings

import torch

from .utils import tf32_allowed


class ReferenceFallbackWarning(UserWarning):
    """An op ran the PyTorch reference instead of its Triton kernels on a GPU."""


_REPORTED: set[tuple[str, str]] = set()


def reference_reason(dtype: torch.dtype, device: torch.device, k_dim: int | None = None) -> str | None:
    """Why a dot kernel cannot take these inputs on `device` (None: it can). Only CUDA launches fall back: the
    interpreter runs every dtype with exact dots. k_dim: the reconstruction's feature width (its dot tiles
    take multiples of 16)."""
    if device.type != "cuda":
        return None
    if dtype == torch.float64:
        return "float64 inputs (the kernels take fp16, bf16, and fp32 with TF32 allowed)"
    if dtype == torch.float32 and not tf32_allowed():
        return ("fp32 inputs without TF32 allowed (set torch.backends.cuda.matmul.fp32_precision = 'tf32', or "
                "train in bf16, to run the kernels)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"{dtype} inputs (the kernels take fp16, bf16, and fp32 with TF32 allowed)"
    if k_dim is not None and k_dim % 16 != 0:
        return "a feature width K that is not a multiple of 16 (the kernels' dot tiles)"
    return None


def note_fallback(op: str, reason: str) -> None:
    """Warn that `op` runs the reference because of `reason`, once per process per (op, reason). Not while
    torch.compile traces: a warning in the traced code would break the graph (compiled runs are not told)."""
    if torch.compiler.is_compiling() or (op, reason) in _REPORTED:
        return
    _REPORTED.add((op, reason))
    warnings.warn(f"cmath_mer: {op} runs the PyTorch reference, not its Triton kernels: {reason}",
                  ReferenceFallbackWarning, stacklevel=3)
