"""`cmath-mer` command line: train, baseline, sweep, evaluate, predict, featurize, convert, synth, bench.
parser.py defines the options, checks.py and prechecks.py refuse what can be told without torch, and only
then are the commands (commands.py, train.py) imported; every error is said in one line."""
from __future__ import annotations

import os
import sys
import traceback

from cmath_mer.errors import CheckpointError, DataError, RunFolderError, UsageError
from cmath_mer.prechecks import check_early
from cmath_mer.training.threads import apply_threads

from .checks import check_options
from .parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)              # usage errors first (exit 2), then missing files (exit 1)
        check_early(args)                                         # before torch is imported
        if "threads" in vars(args):
            args.thread_choice = apply_threads(args.threads)      # before any heavy work
        code = _run(args)
        sys.stdout.flush()                         # a closed pipe shows here, not at the interpreter's exit
        return code
    except KeyboardInterrupt:                      # train says how to resume; the other outputs are atomic
        if args.debug:
            traceback.print_exc()
        print(f"\ncmath-mer: interrupted; {args.command} wrote no partial file", file=sys.stderr)
        return 130
    except BrokenPipeError:                        # `... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except RecursionError:
        if args.debug:
            traceback.print_exc()
        print("cmath-mer: error: an input is nested too deeply to read (JSON or pickle); run with --debug to see "
              "which", file=sys.stderr)
        return 1
    except (UsageError, RunFolderError, DataError, CheckpointError, FloatingPointError, OSError,
            ValueError, _missing_extra_error()) as err:
        if args.debug:
            traceback.print_exc()
        usage = isinstance(err, (UsageError, _missing_extra_error())) or (
            isinstance(err, RunFolderError) and err.usage) or (
            isinstance(err, ValueError) and not isinstance(err, DataError))
        print(f"cmath-mer: error: {_one_line(err)}", file=sys.stderr)
        return 2 if usage else 1


def _run(args) -> int:
    # the commands import torch: imported here, once every check that needs no torch has passed
    from .commands import COMMANDS
    return COMMANDS[args.command](args)


def _missing_extra_error() -> type[Exception]:
    """featurize's MissingExtraError where featurize was imported (it imports torch), else nothing to catch."""
    extra = sys.modules.get("cmath_mer.featurize.extra")
    return extra.MissingExtraError if extra is not None else UsageError


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        what = {28: "no space left on the device"}.get(err.errno, err.strerror or str(err))
        return f"{err.filename}: {what}"
    text = " ".join(str(err).split())
    return text or type(err).__name__
