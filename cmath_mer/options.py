"""The values the choice options take, defined once and importable without torch (the command line checks
its options before it imports torch)."""
from __future__ import annotations

BACKENDS = ("torch", "triton", "auto")    # the ops' implementation: reference, Triton kernels, Triton where it runs
PRECISIONS = ("bf16", "fp16", "fp32")     # autocast dtypes of the training forward (training/precision.py)
