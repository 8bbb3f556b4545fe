"""Helpers of the GPU check: relative error against a reference, bitwise digests, atomic JSON, the processes a
stage starts."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import traceback
from pathlib import Path

import torch

from cmath_mer.training.meter import StepMeter
from cmath_mer.training.precision import Precision
from cmath_mer.training.step import make_optimizer, make_stepper

# ------------------------------------------------------------------------------------------------ helpers

def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool((out.isfinite()).all()):
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes (bitwise identity, whatever the dtype)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def guarded(fn):
    """fn(), or its exception as a row (error and trace): one failing part of a stage costs the stage nothing
    of the rows it measured before."""
    try:
        return fn()
    except Exception as err:                                           # noqa: BLE001 - recorded, not raised
        return dict(error=f"{type(err).__name__}: {err}"[:1500], trace=traceback.format_exc()[-2500:])


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- child processes

def as_text(out) -> str:
    """A process's output as text: what a timeout leaves (TimeoutExpired.stdout) is bytes even with text=True,
    and a stage killed mid-line may end inside a UTF-8 sequence."""
    if isinstance(out, bytes):
        return out.decode(errors="replace")
    return out or ""


def seconds_left(args, margin: float = 5.0) -> float | None:
    """Seconds left of the stage's time limit, less `margin` for the stage to save what it has; None where no
    limit was given (a stage called directly). The driver passes the deadline in wall-clock seconds, taken
    before it started this process, so the interpreter's start and the imports count."""
    deadline = getattr(args, "stage_deadline", None)
    if deadline is None:
        return None
    return max(deadline - time.time() - margin, 1.0)


def run_child(cmd: list[str], args) -> subprocess.CompletedProcess:
    """subprocess.run of a process a stage starts (a demo training run, a determinism worker), stopped a few
    seconds before the stage's own limit: the stage then records it as an error (returncode None, what it
    printed kept) and saves the rest, rather than being killed at its limit with it still running."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds_left(args))
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(cmd, None, as_text(err.stdout),
                                           as_text(err.stderr) + "\n(stopped: the stage's time limit)")


def training_stepper(model, device, precision: str, graphed: bool = False, graphs=None, pad: bool = True):
    """train's step for `model` on `device` (training/step.py's make_stepper): AdamW (lr 1e-3, weight decay
    0.01), autocast in `precision`, clip 1.0, a fresh meter; eager or replayed from CUDA graphs (graphs: the
    CUDA graph API or a stand-in; pad: batches padded to shape classes, as train's)."""
    return make_stepper(model, make_optimizer(model, 1e-3, 0.01), Precision(precision, device), 1.0,
                        StepMeter(device), cuda_graphs=graphed, graphs=graphs, pad=pad)
