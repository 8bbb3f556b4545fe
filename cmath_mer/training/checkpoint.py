"""Checkpoints in safetensors files, written atomically. A run's last.safetensors holds what training needs
to continue (weights, optimizer state, the weight average of ema.py); its best.safetensors holds only the
weights evaluation uses (save_weights: the average where there is one), a quarter of the bytes with AdamW
and an average. The file's metadata carries the model config it was trained with (`config`) and the training
state (`state`), so a checkpoint alone is enough to evaluate (and last.safetensors to resume); config.json
beside it is a readable copy that must agree."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmath_mer.errors import CheckpointError
from cmath_mer.files import atomic_write, bytes_needed
from cmath_mer.training.checkpoint_state import check_param_groups, check_state


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, config: dict | None = None, average: dict[str, torch.Tensor] | None = None) -> None:
    """Write model (+ optimizer, + the weight average of ema.py) tensors and metadata atomically. Refuses
    (CheckpointError) to write a model with non-finite weights, so a good checkpoint is never replaced by a
    NaN one."""
    tensors, meta = _weights(path, {"model": model.state_dict(), "average": average or {}}, state, config)
    if optimizer is not None:
        opt = optimizer.state_dict()
        for idx, per_param in opt["state"].items():
            for name, value in per_param.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        # a learning rate may be a device tensor (the CUDA-graph step reads it there): stored as a number
        meta["param_groups"] = json.dumps([{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items()}
                                           for g in opt["param_groups"]])
    _write(path, tensors, meta)


def save_weights(path: Path, model: torch.nn.Module, state: dict, config: dict | None = None,
                 average: dict[str, torch.Tensor] | None = None) -> None:
    """Write the weights evaluation uses, and nothing to train on: the model's, with the weight average (ema.py)
    in place of the parameters it averages. Loads like any checkpoint (load_checkpoint, averaged or not: both
    give these weights); `--resume` cannot continue from it (no optimizer state)."""
    tensors, meta = _weights(path, {"model": {**model.state_dict(), **(average or {})}}, state, config)
    _write(path, tensors, meta)


def _weights(path: Path, groups: dict[str, dict[str, torch.Tensor]], state: dict,
             config: dict | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors ("<group>.<name>", on the CPU) and metadata of a checkpoint's weights; CheckpointError for
    non-finite weights, so a good checkpoint is never replaced by a NaN one."""
    tensors = {f"{group}.{k}": v.detach().cpu().contiguous() for group, named in groups.items()
               for k, v in named.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(f"{path}: not written: the model has non-finite weights ({bad[0].split('.', 1)[1]})")
    meta = {"state": json.dumps(state)}
    if config is not None:
        meta["config"] = json.dumps(config)
    return tensors, meta


def restate(path: Path, state: dict) -> None:
    """Rewrite a checkpoint with another training state in its metadata, its tensors unchanged (a finished
    run's best.safetensors takes the final state: the history after the selected epoch, the epoch count)."""
    read_metadata(path)                                   # a readable checkpoint, or CheckpointError naming it
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path), device="cpu")
    meta["state"] = json.dumps(state)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), needed=bytes_needed(tensors, meta))


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    meta["sha256"] = json.dumps({k: tensor_sha256(v) for k, v in sorted(tensors.items())})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), needed=bytes_needed(tensors, meta))


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)          # 0-d tensors (a step count) as 1-d
    return hashlib.sha256(t.view(torch.uint8).numpy().data if t.numel() else b"").hexdigest()


def check_digests(path: Path, tensors: dict[str, torch.Tensor], digests: dict | None) -> None:
    """Refuse (CheckpointError naming the tensor) a checkpoint whose tensors are not the ones it was saved
    with: another content, one missing or one added. Checkpoints from before the hashes (None) pass."""
    if digests is None:
        return
    for what, names in (("is missing", set(digests) - set(tensors)),
                        ("was not in it when it was written", set(tensors) - set(digests))):
        if names:
            raise CheckpointError(f"{path}: tensor {sorted(names)[0]!r} {what} (a damaged or altered checkpoint)")
    for name in sorted(digests):
        if tensor_sha256(tensors[name]) != digests[name]:
            raise CheckpointError(f"{path}: tensor {name!r}: its content does not match the SHA-256 stored when "
                                  f"the checkpoint was written (a damaged or altered checkpoint)")


def read_metadata(path: Path) -> dict:
    """The checkpoint's metadata, JSON fields decoded ({'state': ..., 'config': ... or None}); raises
    CheckpointError naming the file when it is missing, empty, truncated or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = json.loads(meta["state"])
        config = json.loads(meta["config"]) if "config" in meta else None
    except Exception as err:        # SafetensorError, KeyError, JSONDecodeError: not a usable checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a readable checkpoint (metadata 'state' is not an object)")
    try:
        digests = json.loads(meta["sha256"]) if "sha256" in meta else None
    except json.JSONDecodeError:
        digests = []
    if digests is not None and not (isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())):
        raise CheckpointError(f"{path}: not a readable checkpoint (metadata 'sha256' is not an object of "
                              f"tensor name -> hash)")
    check_state(path, state)
    return {"state": state, "config": config, "param_groups": check_param_groups(path, meta.get("param_groups")),
            "sha256": digests}


_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    device: str | torch.device = "cpu", *, averaged: bool = False,
                    average_into=None) -> dict:
    """Load weights (and optimizer state) into model (and optimizer); return the training state. Raises
    CheckpointError for an unreadable file, weights that do not fit the model, or non-finite weights.
    averaged: load the weight average (ema.py) where the checkpoint has one: what evaluation uses.
    average_into: a WeightAverage that receives the checkpoint's average (to resume training)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    check_digests(path, tensors, meta["sha256"])
    bad = non_finite_tensors({k: v for k, v in tensors.items() if k.startswith("optim.")})
    if bad and optimizer is not None:
        # NaN moments would make every step after the resume non-finite
        raise CheckpointError(f"{path}: the optimizer state holds non-finite values ({bad[0]}); the run cannot "
                              f"continue from this checkpoint")
    tensors = {k: v.to(device) for k, v in tensors.items()}
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    average = {k[len("average."):]: v for k, v in tensors.items() if k.startswith("average.")}
    if averaged:
        weights.update(average)
    bad = non_finite_tensors(weights)
    if bad:
        raise CheckpointError(f"{path}: the checkpoint holds non-finite weights ({bad[0]}); it cannot be used")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"{path}: the weights do not fit the model of its config "
                              f"({first[-1].strip() if first else err})") from None
    if average_into is not None and average:
        average_into.load(average)
    if optimizer is not None and meta["param_groups"] is not None:
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        # how the update is computed (fused, foreach, capturable) is this run's choice, made for its device
        # and engine, not the saved run's; the hyperparameters and the state are the checkpoint's
        own = [{k: g[k] for k in _IMPLEMENTATION if k in g} for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path}: the optimizer state does not fit the model ({err})") from None
        for group, flags in zip(optimizer.param_groups, own):
            group.update(flags)
    return meta["state"]
