"""The commands, each run with options already checked (checks.py, prechecks.py). Importing this module
imports torch: the command line does so only once the torch-free checks have passed."""
from __future__ import annotations

import json
from pathlib import Path

from cmath_mer.bench import run_benchmarks, sweep
from cmath_mer.data import DataError, check_compatible, convert, synth
from cmath_mer.errors import ConfigError, UsageError
from cmath_mer.featurize import FinetuneOptions, featurize, featurize_for_model
from cmath_mer.featurize.cache import training_cache
from cmath_mer.table_layouts import TABLE_SUFFIXES, parse_columns
from cmath_mer.training.baseline import context_free_baseline
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.config import TrainConfig
from cmath_mer.training.context_baseline import context_gru_baseline
from cmath_mer.training.device import resolve_device
from cmath_mer.training.ensemble import load_for_prediction, representative
from cmath_mer.training.evaluate import evaluation_conversations, predict_conversations
from cmath_mer.training.metrics import classification_metrics
from cmath_mer.training.multi_run import check_folder
from cmath_mer.training.precision import check_precision
from cmath_mer.training.prepare import make_splits
from cmath_mer.training.sweep import load_grid, run_sweep

from .checks import input_file, output_file
from .loading import load, load_for_run, loader_options, usable_device
from .predict_output import prediction_rows, write_predictions
from .train import cmd_train


def cmd_sweep(args) -> int:
    grid = load_grid(Path(args.grid))
    check_folder(args.out, "sweep", resume=args.resume, overwrite=args.overwrite)     # before the data is read
    data = load(args.data, args.preset, 0, args.class_names)
    run_sweep(data, args.preset, args.modalities, grid, args.seeds, args.out, resume=args.resume,
              overwrite=args.overwrite, where=f"--grid {args.grid}", progress=not args.no_progress)
    print(f"wrote {args.out}/sweep.md and sweep.json (one folder per recipe and seed)")
    return 0


def cmd_baseline(args) -> int:
    data = load(args.data, args.preset, args.seed, args.class_names)
    splits = make_splits(data, TrainConfig.valid_fraction, args.seed)
    result = context_free_baseline(data, splits, args.modalities)
    result["context_gru"] = context_gru_baseline(data, splits, args.modalities, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


def _eval_precision(args, device: str) -> str:
    """--precision when given (refused where the device cannot run it); else the run's own training
    precision (fp32 for runs from before --precision, and where this device has no bf16)."""
    if args.precision is not None:
        return check_precision(args.precision, device)
    state = read_metadata(representative(Path(args.checkpoint)) / "best.safetensors")["state"]
    run = (state.get("train_config") or {}).get("precision") or "fp32"
    try:
        return check_precision(run, device)
    except ConfigError:
        return "fp32"


def cmd_evaluate(args) -> int:
    model = load_for_prediction(Path(args.checkpoint), usable_device(args.device))
    data = load_for_run(args.data, representative(Path(args.checkpoint)), model.config.modalities,
                        args.class_names)
    check_compatible(data, model.config)
    precision = _eval_precision(args, str(next(model.parameters()).device))
    y, p, _ = predict_conversations(model, data, evaluation_conversations(data), precision=precision)
    if not (y >= 0).any():
        raise DataError(f"{data.source}: field 'labels': no utterance to evaluate is labelled (all are "
                        f"unlabelled, -100)")
    metrics = classification_metrics(y, p, data.class_names)
    print(json.dumps(metrics, indent=2))
    return 0


def _table_options(args) -> dict:
    return {"layout": args.layout, "columns": parse_columns(args.columns), "media_root": args.media_root}


def cmd_predict(args) -> int:
    ckpt = Path(args.checkpoint)
    out = output_file("--out", args.out, [Path(args.data), ckpt / "best.safetensors", ckpt / "config.json", ckpt])
    device = usable_device(args.device)
    model = load_for_prediction(ckpt, device)
    corpus = None
    if Path(args.data).suffix.lower() in TABLE_SUFFIXES:
        data, corpus = featurize_for_model(args.data, model.config, checkpoint=args.checkpoint,
                                           cache=training_cache(representative(ckpt)),
                                           text_encoder=args.text_encoder, missing_audio=args.missing_audio,
                                           device=device, progress=not args.no_progress,
                                           **_table_options(args))
    else:
        data = load_for_run(args.data, representative(ckpt), model.config.modalities, args.class_names)
    check_compatible(data, model.config)
    precision = _eval_precision(args, device)
    y, p, prob = predict_conversations(model, data, list(range(len(data))), precision=precision)   # file order
    header, rows = prediction_rows(data, model.config.class_names, y, p, prob, corpus)
    write_predictions(out, header, rows)
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


def cmd_featurize(args) -> int:
    if args.device is not None:
        usable_device(args.device)
    data = featurize(args.tables, args.out, split=args.split, **_table_options(args),
                     finetune=_finetune_options(args), class_names=args.class_names,
                     text_encoder=args.text_encoder, audio_features=args.audio_features,
                     missing_audio=args.missing_audio, cache=not args.no_cache, device=args.device,
                     batch_size=args.batch_size, progress=not args.no_progress)
    splits = {s: len(data.indices(s)) for s in ("train", "valid", "test") if data.indices(s)}
    print(f"wrote {args.out}: {len(data)} conversations ({', '.join(f'{n} {s}' for s, n in splits.items())}), "
          f"{int(data.cu_seqlens[-1])} utterances, "
          + ", ".join(f"{m} {d}" for m, d in data.input_dims.items()) + " dims, "
          f"{data.num_classes} classes, up to {data.num_speakers} speakers per conversation")
    return 0


FINETUNE_OPTIONS = ("epochs", "lr", "finetune_batch_size", "max_tokens", "patience", "seed", "precision")


def _finetune_options(args):
    """featurize's fine-tuning options (featurize/finetune.py), refused without --finetune."""
    given = {k: getattr(args, k) for k in FINETUNE_OPTIONS if getattr(args, k) is not None}
    if not args.finetune:
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} applies only with --finetune")
        return None
    if "finetune_batch_size" in given:
        given["batch_size"] = given.pop("finetune_batch_size")
    options = FinetuneOptions(**given).check()
    check_precision(options.precision, resolve_device(args.device or "auto"))
    return options


def cmd_convert(args) -> int:
    src = input_file("input", args.input)
    out = output_file("output", args.output, [src])
    convert(src, out, **loader_options(args.class_names, args.input))
    print(f"wrote {args.output}")
    return 0


def cmd_synth(args) -> int:
    synth(output_file("output", args.output), preset=args.preset, conversations=args.conversations,
          min_length=args.min_length,
          max_length=args.max_length, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


def cmd_bench(args) -> int:
    if args.long:
        run_benchmarks(args.out, quick=args.quick, device=args.device, cases=sweep(args.quick, args.device, long=True),
                       time_budget_s=3600.0)
    else:
        run_benchmarks(args.out, quick=args.quick, device=args.device)
    return 0


COMMANDS = {"train": cmd_train, "baseline": cmd_baseline, "sweep": cmd_sweep, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "featurize": cmd_featurize, "convert": cmd_convert, "synth": cmd_synth,
            "bench": cmd_bench}
