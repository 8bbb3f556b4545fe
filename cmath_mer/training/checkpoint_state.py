"""The training state a checkpoint's metadata carries, checked field by field when it is read: a damaged or
hand-edited field is refused with one line naming the file and the field, before training, evaluation or
--resume use it."""
from __future__ import annotations

import dataclasses
import json

from cmath_mer.errors import CheckpointError

SPLIT_NAMES = ("train", "valid", "test")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _object_or_none(v) -> bool:
    return v is None or isinstance(v, dict)


def _best(v, keys: dict) -> bool:
    return v is None or isinstance(v, dict) and all(k in v and ok(v[k]) for k, ok in keys.items())


def _splits(v) -> bool:
    return isinstance(v, dict) and all(isinstance(v.get(s), list) and all(_is_int(i) and i >= 0 for i in v[s])
                                       for s in SPLIT_NAMES)


def _history(v) -> bool:
    return isinstance(v, list) and all(isinstance(r, dict) and _is_int(r.get("epoch")) for r in v)


FIELDS = {   # field: (required, check, what it should be)
    "epoch": (True, lambda v: _is_int(v) and v >= 0, "a whole number of epochs >= 0"),
    "global_step": (True, lambda v: _is_int(v) and v >= 0, "a whole number of steps >= 0"),
    "history": (True, _history, "a list of per-epoch objects, each with its epoch"),
    "splits": (True, _splits, "an object of train, valid and test lists of conversation indices"),
    "best_valid": (False, lambda v: _best(v, {"score": _is_number, "epoch": _is_int, "valid": _object_or_none,
                                              "test": _object_or_none}),
                   "null or an object with score, epoch, valid and test"),
    "best_test": (False, lambda v: _best(v, {"weighted_f1": _is_number, "accuracy": _is_number, "epoch": _is_int}),
                  "null or an object with weighted_f1, accuracy and epoch"),
    "train_config": (False, _object_or_none, "an object of training settings"),
    "data": (False, _object_or_none, "an object describing the training data"),
    "run": (False, _object_or_none, "an object"),
    "baseline": (False, _object_or_none, "an object"),
    "scaler": (False, _object_or_none, "an object"),
    "ema_updates": (False, lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
}


def check_state(path, state: dict) -> dict:
    """`state` if every field is as train.py writes it, else CheckpointError naming the file and the field."""
    for name, (required, ok, what) in FIELDS.items():
        if name not in state:
            if required:
                raise CheckpointError(f"{path}: field 'state.{name}' is missing (a damaged or altered checkpoint)")
            continue
        if not ok(state[name]):
            raise CheckpointError(f"{path}: field 'state.{name}': expected {what}, got "
                                  f"{json.dumps(state[name])[:60]} (a damaged or altered checkpoint)")
    if isinstance(state.get("train_config"), dict):
        _check_train_config(path, state["train_config"])
    return state


def _check_train_config(path, saved: dict) -> None:
    from cmath_mer.errors import ConfigError
    from cmath_mer.training.config import TrainConfig
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - fields)
    if unknown:
        raise CheckpointError(f"{path}: field 'state.train_config': unknown setting {unknown[0]!r}")
    try:
        TrainConfig(**saved)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: field 'state.train_config': {err}") from None


def check_param_groups(path, text: str | None) -> list | None:
    """The optimizer's parameter groups (JSON in the metadata): a list of objects, each with its params."""
    if text is None:
        return None
    try:
        groups = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        groups = None
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise CheckpointError(f"{path}: field 'param_groups': expected a list of optimizer parameter groups "
                              f"(a damaged or altered checkpoint)")
    return groups
