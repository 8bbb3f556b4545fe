"""Which implementation of the three ops runs: the PyTorch reference or the Triton kernels.

`CMATH_BACKEND=torch|triton|auto` (or the model config's `backend` field, which wins when set).
`CMATH_RECONSTRUCTION=auto|kernel|chunked` picks, on the triton backend, the reconstruction loss's
implementation: the Triton kernels or row chunks on cuBLAS (kernels/reconstruction/chunked.py); auto (the
default) = chunked on CUDA, the kernels elsewhere (reconstruction_impl; docs/KERNELS.md says why).
auto = triton when the tensors live on a CUDA device and triton imports, torch otherwise.
`triton` on CPU tensors is only meaningful under TRITON_INTERPRET=1 (how the tests check kernels).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from cmath_mer.options import BACKENDS

from ..errors import UsageError

# Found once at import, without importing triton: a plain constant, which torch.compile reads without
# tracing a cache wrapper (an lru_cache here made dynamo warn on every compile).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Return 'torch' or 'triton' for tensors on `device`."""
    name = requested if requested is not None else os.environ.get("CMATH_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)} "
                         "(config field `backend` or env var CMATH_BACKEND)")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                               "cmath_mer is imported; use backend 'torch' on the CPU")
    return name


def check_backend_usable(requested: str | None, device: torch.device) -> None:
    """Refuse at start (UsageError naming --backend or CMATH_BACKEND) a backend that cannot run on `device`,
    rather than at the first step."""
    where = f"--backend {requested}" if requested is not None else \
        f"CMATH_BACKEND={os.environ.get('CMATH_BACKEND', 'auto')}"
    try:
        resolve_backend(requested, device)
    except (ValueError, RuntimeError) as err:
        raise UsageError(f"{where}: {err}") from None


RECONSTRUCTION_IMPLS = ("auto", "kernel", "chunked")


def reconstruction_impl(device: torch.device | None = None) -> str:
    """'kernel' or 'chunked' for the triton backend's reconstruction loss on `device`. auto: chunked on CUDA,
    where the one measurement (H100, bf16, 32,768 x 256 -> 1,582, fwd+bwd) had cuBLAS addmm + MSE at 0.80 ms
    against 1.95 ms for the Triton kernels: at K = 256 the op is a GEMM problem. The kernels elsewhere (the
    interpreter, which has no cuBLAS path to measure)."""
    name = os.environ.get("CMATH_RECONSTRUCTION", "auto")
    if name not in RECONSTRUCTION_IMPLS:
        raise ValueError(f"CMATH_RECONSTRUCTION={name!r}: choose one of {', '.join(RECONSTRUCTION_IMPLS)}")
    if name == "auto":
        return "chunked" if device is not None and device.type == "cuda" else "kernel"
    return name
