"""`cmath-mer train`: one run, or one per seed (--seeds), new or resumed, alone or under torchrun; the
results said in a few lines."""
from __future__ import annotations

import sys
from pathlib import Path

from cmath_mer.data import check_compatible
from cmath_mer.errors import ConfigError, UsageError
from cmath_mer.training import distributed
from cmath_mer.training.config import train_preset
from cmath_mer.training.multi_run import check_folder
from cmath_mer.training.precision import check_precision
from cmath_mer.training.prepare import build_config
from cmath_mer.training.preset_choice import DEFAULT_PRESET, choose_preset
from cmath_mer.training.run_folder import (
    check_new_run_folder,
    check_resume,
    data_fingerprint,
    resume_settings,
    run_files,
)
from cmath_mer.training.seeds import seed_folder, train_seeds
from cmath_mer.training.train import train

from .checks import overrides
from .loading import data_seed, load, usable_device

# the options a resumed run may be given: each must agree with the run, or be one it can change
RESUME_OPTIONS = ("lr", "patience", "seed", "preset", "precision", "accumulate", "backend", "epochs", "device",
                  "compile", "deterministic", "data_on_device", "cuda_graphs", "keep_last")


def cmd_train(args) -> int:
    """Under torchrun (RANK/WORLD_SIZE in the environment) every process runs this: rank 0 checks the run
    folder and reads a run to resume, every rank reads the data (a rank that cannot stops them all), and
    train() runs the distributed loop."""
    device = usable_device(_device_option(args), args.backend)
    if args.precision is not None:
        check_precision(args.precision, device)
    try:
        distributed.setup(device, args.dist_backend)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    try:
        return _train_command(args)
    finally:
        distributed.teardown()


def _device_option(args) -> str:
    return args.device if args.device is not None else "auto"


def _resume_settings(args, folder: Path):
    """resume_settings (training/run_folder.py) for the options given on the command line."""
    given = {key: getattr(args, key) for key in RESUME_OPTIONS}
    given["modalities"] = args.modalities
    return resume_settings(folder, given, overrides(args.set), args.out)


def _resumed(args, folder: Path):
    """(config, TrainConfig, preset, data seed, data, None) of the run in `folder`, its settings read by rank
    0 (the preset is the run's own: no new reason to give)."""
    saved, config, tcfg, preset_name, notes = distributed.on_main(_resume_settings, args, folder)
    seed = data_seed(saved.state)
    data = distributed.agree(load, args.data, preset_name, seed, args.class_names)
    check_compatible(data, config)
    distributed.on_main(check_resume, saved, config, tcfg,              # before saying anything
                        data_fingerprint(data, config.modalities))
    if distributed.context().main:
        for note in notes:
            print(note, file=sys.stderr)
    return config, tcfg, preset_name, seed, data, None


def _new(args, out: Path, seeds: list[int] | None):
    """(config, TrainConfig, preset, data seed, data, why that preset) of a new run, its folder checked first."""
    def check_folders():                                               # before the data is read
        if seeds is None:
            check_new_run_folder(out, overwrite=args.overwrite)
        else:
            check_folder(out, "seeds", resume=False, overwrite=args.overwrite)
    distributed.on_main(check_folders)
    seed = 0 if args.seed is None else args.seed          # a synthetic corpus is built with it (under --seeds too)
    given_overrides = overrides(args.set)
    if args.backend is not None:
        given_overrides["backend"] = args.backend
    elif "backend" in given_overrides:                                 # --set's backend, checked on the device
        usable_device(_device_option(args), given_overrides["backend"])
    # every rank reads the data; one that cannot (a missing or bad file on its machine) stops them all
    data = distributed.agree(load, args.data, args.preset or DEFAULT_PRESET, seed, args.class_names)
    preset_name, preset_why = choose_preset(data, args.preset, args.data)
    config = build_config(data, preset_name, args.modalities, **given_overrides)
    given = {"epochs": args.epochs, "lr": args.lr, "patience": args.patience, "precision": args.precision,
             "accumulate": args.accumulate, "compile": args.compile, "deterministic": args.deterministic,
             "data_on_device": args.data_on_device, "cuda_graphs": args.cuda_graphs, "keep_last": args.keep_last}
    tcfg = train_preset(preset_name, seed=seed, device=_device_option(args),
                        **{k: v for k, v in given.items() if v is not None})
    return config, tcfg, preset_name, seed, data, preset_why


def _train_command(args) -> int:
    out, seeds = Path(args.out), args.seeds
    resume = args.resume
    if resume and seeds is not None:
        distributed.on_main(check_folder, out, "seeds", resume=True, overwrite=False)
        begun = [seed_folder(out, s) for s in seeds if run_files(seed_folder(out, s))]
        resume = bool(begun)                  # killed before its first run began: it starts anew
    if resume:
        # the settings of the seeds' runs: those of the first one begun
        config, tcfg, preset_name, seed, data, preset_why = _resumed(args, out if seeds is None else begun[0])
    else:
        config, tcfg, preset_name, seed, data, preset_why = _new(args, out, seeds)
    run_info = {"preset": preset_name, "data": args.data, "data_seed": seed,    # evaluate rebuilds synthetic
                "threads": args.thread_choice.as_dict()}
    if not args.resume:
        run_info["preset_why"] = preset_why
    if Path(args.data).is_file():                                      # predict reads its featurize cache
        run_info["data_path"] = str(Path(args.data).resolve())
    main_rank = distributed.context().main
    try:
        if seeds is not None:
            train_seeds(data, config, tcfg, out, seeds, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, run_info=run_info)
            if main_rank:
                print(f"wrote {out}/seed-*/ (one run folder per seed) and {out}/summary.json")
            return 0
        metrics = train(data, config, tcfg, out, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress, run_info=run_info)
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted; the last finished epoch is saved in {out}. Continue with:\n"
                  f"  cmath-mer train --data {args.data} --out {out} --resume", file=sys.stderr)
        return 130
    if main_rank:
        _say_results(metrics, out)
    return 0


def _say_results(metrics: dict, out: Path) -> None:
    sel, best = metrics["selected_by_validation"], metrics["best_test_epoch"]
    if sel["weighted_f1"] is not None:
        print(f"test weighted F1 {sel['weighted_f1']:.2f}  accuracy {sel['accuracy']:.2f}  "
              f"(epoch {sel['epoch']}, selected on {sel.get('selected_on', 'validation')})")
    base = metrics.get("baseline_context_free")
    if base and base.get("test"):
        print(f"context-free baseline (logistic regression, same features and split): test weighted F1 "
              f"{base['test']['weighted_f1']:.2f}  accuracy {base['test']['accuracy']:.2f}")
    gru = metrics.get("baseline_context_gru")
    if gru and gru.get("test"):
        print(f"context baseline (bidirectional GRU, same features and split): test weighted F1 "
              f"{gru['test']['weighted_f1']:.2f}  accuracy {gru['test']['accuracy']:.2f}")
    if best:
        print(f"best test epoch {best['epoch']}: weighted F1 {best['weighted_f1']:.2f}  accuracy "
              f"{best['accuracy']:.2f}  (peers' protocol, for comparison only)")
    written = [f for f in ("config.json", "train_config.json", "best.safetensors", "last.safetensors", "metrics.json",
                           "confusion_matrix.png", "training_curves.png") if (out / f).exists()]
    print(f"wrote {out}/{', '.join(written)}")
