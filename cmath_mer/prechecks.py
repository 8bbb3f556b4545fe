"""The checks of a command that need no torch, run before anything imports it: the files and folders it
reads exist, a conversation table has the columns it needs, and the plain option values are in range. A
typo then costs a moment instead of a torch import; the commands check everything again as they read."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError, DataError, UsageError
from .table_layouts import TABLE_SUFFIXES, check_table_columns, parse_columns, parse_spec
from .training.preset_choice import is_synthetic


def _data_file(data: str | None) -> None:
    # under torchrun each rank reads its own copy: the ranks agree on a missing file and name the rank and host
    # that lacks it (distributed.agree), which this check, run by every rank alone, could not
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    if data and not is_synthetic(data) and not Path(data).exists():
        raise DataError(f"{data}: no such file")


def _table(spec: str, args) -> None:
    _data_file(parse_spec(spec)[0])
    problem = check_table_columns(spec, getattr(args, "layout", "auto"), parse_columns(getattr(args, "columns", None)))
    if problem:
        raise DataError(problem)


def _checkpoint(folder: str | None) -> None:
    if folder and not Path(folder).is_dir():
        raise CheckpointError(f"--checkpoint {folder}: not a run folder"
                              + (" (no such folder)" if not Path(folder).exists() else ""))


def check_early(args) -> None:
    """Raise the error the command would raise later, for what can be told without torch."""
    command = args.command
    if command == "featurize":
        for spec in args.tables:
            _table(spec, args)
        return
    if command in ("evaluate", "predict"):
        _checkpoint(args.checkpoint)
    if command == "sweep" and not Path(args.grid).is_file():
        raise UsageError(f"--grid {args.grid}: no such file")
    data = getattr(args, "data", None)
    if command == "predict" and data and Path(data).suffix.lower() in TABLE_SUFFIXES:
        _table(data, args)
    else:
        _data_file(data)
