"""Which device a run trains on: 'auto' resolved once, checked once (a ConfigError naming --device), and made
the current CUDA device while training."""
from __future__ import annotations

import contextlib

import torch

from cmath_mer.errors import ConfigError
from cmath_mer.kernels.backend import triton_available


def resolve_device(name: str | None) -> str:
    """'auto' (or None): cuda when torch sees a CUDA device, else cpu. Anything else is returned as given
    (checked by check_device)."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(name: str, backend: str | None = None) -> torch.device:
    """A usable torch.device for `name` (auto, cpu, cuda, cuda:N) and, given, the ops' `backend` on it; or
    ConfigError naming --device (--backend)."""
    name = resolve_device(name)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a device; use auto, cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only auto, cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: torch sees no CUDA device (a CPU-only torch, or no GPU); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if backend == "triton":
        if not triton_available():
            raise ConfigError("--backend triton: triton is not installed; use --backend torch")
        if dev.type != "cuda":
            raise ConfigError(f"--backend triton needs a CUDA device (--device {name}); use --backend torch "
                              "on the CPU")
    return dev


@contextlib.contextmanager
def on_device(device: torch.device):
    """cuda:N is the current CUDA device while training (pin_memory, kernel launches and anything else that
    uses the current device then agree with the model's); nothing on the CPU."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield
