"""The command line's option checks that need no torch. `check_options` runs before the files are looked at
(prechecks.py) and before torch is imported: a bad option is said (exit 2) even when an input is missing too.
A value that was given is used or refused, never replaced by a default (`is None`, never `if args.x`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from cmath_mer.errors import ConfigError, UsageError
from cmath_mer.model.config import MODALITIES, check_overrides

MAX_SEED = 2**32 - 1              # the per-epoch and per-step seeds derived from it stay 64-bit integers
MAX_INT = 2**63 - 1


def names_option(option: str, value: str, known: tuple[str, ...] | None = None) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(","))
    if not value.strip() or any(not n for n in names):
        raise UsageError(f"{option} {value!r}: expected comma-separated names, none of them empty")
    dup = [n for i, n in enumerate(names) if n in names[:i]]
    if dup:
        raise UsageError(f"{option} {value!r}: {dup[0]!r} is named twice")
    if known is not None:
        bad = [n for n in names if n not in known]
        if bad:
            raise UsageError(f"{option}: unknown name {bad[0]!r}; choose from {', '.join(known)}")
    return names


def input_file(option: str, path: str | None) -> Path | None:
    """The file an option names (None where the command has no such option); an empty path is refused."""
    if path is None:
        return None
    if not path:
        raise UsageError(f"{option}: empty path")
    return Path(path)


def output_file(option: str, path: str, inputs: list[Path] = ()) -> Path:
    """An output file: not empty, not a folder, in an existing folder, and not one of the inputs."""
    if not path:
        raise UsageError(f"{option}: empty path")
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {out}: is a folder; name a file")
    if not out.parent.is_dir():
        raise UsageError(f"{option} {out}: the folder {out.parent} does not exist")
    for src in inputs:
        try:
            same = src.exists() and out.exists() and out.samefile(src)
        except OSError:
            same = False
        if same or out.resolve() == src.resolve():
            raise UsageError(f"{option} {out}: is an input of this command ({src}); writing it would destroy "
                             "the input; name another file")
    return out


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2,3,4") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed is repeated")
    if any(s < 0 for s in seeds):
        raise UsageError(f"--seeds {text!r}: seeds must be >= 0")
    if any(s > MAX_SEED for s in seeds):
        raise UsageError(f"--seeds {text!r}: seeds must be at most {MAX_SEED}")
    return seeds


def overrides(text: str | None) -> dict:
    """--set: the JSON of config overrides, checked against the config's fields."""
    if text is None:
        return {}
    try:
        given = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--set: not valid JSON ({err}); e.g. --set '{{\"window\": 32}}'") from None
    except RecursionError:
        raise UsageError("--set: the JSON is nested too deeply") from None
    try:
        return check_overrides(given, "--set")
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _out_folder(args, what: str, folder: str) -> None:
    """--out, --resume and --overwrite of a command that writes a folder of runs (`what`: run, sweep)."""
    if args.out == "":
        raise UsageError(f"--out: empty path; name {folder}")
    if args.resume and args.overwrite:
        raise UsageError(f"--resume and --overwrite contradict each other: continue the {what}, or replace it")


def _train_options(args) -> None:
    _out_folder(args, "run", "the run folder")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience {args.patience}: must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be at least 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a finite number > 0")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    if args.accumulate is not None and args.accumulate < 1:
        raise UsageError(f"--accumulate {args.accumulate}: must be at least 1")
    if args.seeds is not None:
        args.seeds = seed_list(args.seeds)
        if args.seed is not None:
            raise UsageError("--seed and --seeds contradict each other: give one")


def _sweep_options(args) -> None:
    _out_folder(args, "sweep", "the sweep's folder")
    args.seeds = seed_list(args.seeds)


def _synth_options(args) -> None:
    if args.conversations < 1:
        raise UsageError(f"--conversations {args.conversations}: must be at least 1")
    if not 1 <= args.min_length <= args.max_length:
        raise UsageError(f"--min-length {args.min_length} / --max-length {args.max_length}: need "
                         "1 <= min <= max")


def _featurize_options(args) -> None:
    tables = [Path(t) for t in args.tables] + [Path(t.rsplit(":", 1)[0]) for t in args.tables if ":" in t]
    output_file("--out", args.out, tables)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")


def _check_int_options(args) -> None:
    """An integer option too large for the 64-bit integers it becomes: refused naming the option."""
    for name, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        limit = MAX_SEED if name == "seed" else MAX_INT
        if abs(value) > limit:
            raise UsageError(f"--{name.replace('_', '-')} {value}: too large (at most {limit})")


def _parse_names(args) -> None:
    """--modalities and --class-names, checked once here and kept as tuples of names for the command."""
    if getattr(args, "modalities", None) is not None:
        args.modalities = names_option("--modalities", args.modalities, MODALITIES)
    if getattr(args, "class_names", None) is not None:
        args.class_names = names_option("--class-names", args.class_names)


def check_options(args) -> None:
    """The option values that need neither torch nor the files, checked before anything else; the list
    options (--modalities, --class-names, --seeds) are left parsed in `args` for the command."""
    _check_int_options(args)
    for option in ("data", "checkpoint"):
        input_file(f"--{option}", getattr(args, option, None))
    if args.command == "train":
        _train_options(args)
    elif args.command == "sweep":
        _sweep_options(args)
    elif args.command == "baseline" and args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    elif args.command == "featurize":
        _featurize_options(args)
    elif args.command == "synth":
        _synth_options(args)
    _parse_names(args)
