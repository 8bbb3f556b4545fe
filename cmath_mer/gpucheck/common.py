"""Helpers of the GPU check: relative error against a reference, bitwise digests, atomic JSON."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


# ------------------------------------------------------------------------------------------------ helpers

def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool((out.isfinite()).all()):
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes (bitwise identity, whatever the dtype)."""
    import torch
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)




def training_stepper(model, device, precision: str, graphed: bool = False):
    """train.py's step for `model` on `device`: AdamW (lr 1e-3, weight decay 0.01), autocast in `precision`,
    clip 1.0, a fresh meter; eager (engine.Stepper) or replayed from CUDA graphs (graphed_step.py)."""
    from .. import engine
    from ..graphed_step import GraphedStepper
    optimizer = engine.make_optimizer(model, 1e-3, 0.01)
    prec, meter = engine.Precision(precision, device), engine.StepMeter(device)
    if graphed:
        return GraphedStepper(model, optimizer, prec, 1.0, meter)
    return engine.Stepper(model, model, optimizer, prec, 1.0, meter)
