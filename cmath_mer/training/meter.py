"""Running sums of the training step kept on the device, and the one place they come to the host.

What a step never does: read a tensor on the host (`.item()`, `.cpu()`, `bool(t)`, `float(t)`). Loss,
gradient norm and the count of non-finite values accumulate in one device tensor; `StepMeter.read` is the
only place they come to the host (a "logging point": every StepMeter.LOG_EVERY optimizer steps and at the end of an
epoch), and that is where a non-finite loss or gradient is caught, naming the epoch and the step range.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from cmath_mer.training import distributed


class StepMeter:
    """Sums over the steps since the last read, on the device: loss x utterances, utterances, gradient
    norm, optimizer steps, non-finite losses, non-finite gradient norms (fp16: skipped steps). In a
    distributed run the read sums the first three kinds over the ranks (the gradient norm is the same on
    every rank after the all-reduce), so every rank sees, and stops on, the same numbers."""
    LOG_EVERY = 25            # optimizer steps between two reads (the logging points of the training loop)
    LOSS, UTT, GNORM, STEPS, BAD_LOSS, BAD_GRAD = range(6)
    PER_RANK = [LOSS, UTT, BAD_LOSS]

    def __init__(self, device):
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.first_step = None                # global step (1-based) of the first step since the last read

    def add_loss(self, loss: torch.Tensor, utterances: int | torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """loss of a batch of `utterances` (a device count for a padded batch: its real rows); weight (default:
        utterances) multiplies it in the loss sum: a part of a step whose loss is its share of the step's mean
        passes the step's utterance count."""
        loss = loss.detach().to(torch.float64)
        finite = torch.isfinite(loss)
        self.sums[self.LOSS] += torch.where(finite, loss * (utterances if weight is None else weight), 0.0)
        self.sums[self.UTT] += utterances
        self.sums[self.BAD_LOSS] += (~finite).to(torch.float64)

    def add_step(self, grad_norm: torch.Tensor, step: int) -> None:
        self.note_step(step)
        self.add_norm(grad_norm)

    def note_step(self, step: int) -> None:
        """Host bookkeeping of a step (kept apart from add_norm: a CUDA graph replays only device work)."""
        if self.first_step is None:
            self.first_step = step

    def add_norm(self, grad_norm: torch.Tensor) -> None:
        norm = grad_norm.detach().to(torch.float64)
        finite = torch.isfinite(norm)
        self.sums[self.GNORM] += torch.where(finite, norm, 0.0)
        self.sums[self.STEPS] += 1
        self.sums[self.BAD_GRAD] += (~finite).to(torch.float64)

    def read(self) -> dict:
        """The logging point: one host read of all sums, then reset."""
        if distributed.context().active:
            self.sums[self.PER_RANK] = distributed.all_reduce_sum(self.sums[self.PER_RANK])
        with logging_point():
            v = self.sums.tolist()
        self.sums.zero_()
        first, self.first_step = self.first_step, None
        return {"loss_sum": v[self.LOSS], "utterances": v[self.UTT], "grad_norm_sum": v[self.GNORM],
                "steps": int(v[self.STEPS]), "bad_loss": int(v[self.BAD_LOSS]), "bad_grad": int(v[self.BAD_GRAD]),
                "first_step": first}


_STATE = threading.local()


@contextlib.contextmanager
def _marked(flag: str):
    prev = getattr(_STATE, flag, False)
    setattr(_STATE, flag, True)
    try:
        yield
    finally:
        setattr(_STATE, flag, prev)


def logging_point():
    """Marks a deliberate host read (tests spy on Tensor.item/.cpu and allow them only here)."""
    return _marked("logging")


def in_step():
    """Marks the training step: between here and its end nothing may read a device tensor on the host."""
    return _marked("step")


def phase() -> str:
    """'logging' inside logging_point(), 'step' inside a training step, else 'other' (for the tests)."""
    if getattr(_STATE, "logging", False):
        return "logging"
    return "step" if getattr(_STATE, "step", False) else "other"
