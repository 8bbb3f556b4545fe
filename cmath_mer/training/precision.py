"""What bf16, fp16 and fp32 mean for a run, in one place: the autocast dtype of the forward (weights and optimizer
state stay fp32: the master copy), whether the device supports it, the default per device, and fp16's loss
scaler."""
from __future__ import annotations

import contextlib

import torch

from cmath_mer.errors import ConfigError
from cmath_mer.training.config import PRECISIONS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP16_INIT_SCALE = 2.0**16  # fp16: the GradScaler's first loss scale (torch's default; tests raise it)


def bf16_supported(device: str | torch.device) -> bool:
    dev = torch.device(device)
    if dev.type == "cpu":
        return True                       # autocast to bfloat16 runs on any CPU (emulated where not native)
    with torch.cuda.device(dev):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def default_precision(device: str | torch.device) -> str:
    """bf16 on CUDA cards with native bfloat16 (sm_80 and later), fp32 elsewhere (the CPU included)."""
    dev = torch.device(device)
    return "bf16" if dev.type == "cuda" and bf16_supported(dev) else "fp32"


def check_precision(precision: str, device: str | torch.device) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "bf16" and dev.type == "cuda" and not bf16_supported(dev):
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no native bfloat16; use "
                          f"--precision fp16 (loss scaling) or fp32")
    return precision


class Precision:
    """torch.autocast for the forward (weights and optimizer state stay fp32: they are the master copy),
    and for fp16 a GradScaler that scales the loss and skips a step whose gradients hold inf/NaN."""

    def __init__(self, name: str, device: str | torch.device):
        self.name = name
        self.device_type = torch.device(device).type
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(self.device_type, init_scale=FP16_INIT_SCALE, enabled=name == "fp16")

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict | None:
        """The scaler's state (scale, growth tracker) for the checkpoint; None when there is no scaler."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
