"""`cmath-mer` command line: train, baseline, sweep, evaluate, predict, featurize, convert, synth, bench."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import traceback
from pathlib import Path

from cmath_mer.errors import CheckpointError, ConfigError, DataError, RunFolderError, UsageError
from cmath_mer.model.config import MODALITIES, PRESETS, check_overrides
from cmath_mer.prechecks import check_early
from cmath_mer.table_layouts import TABLE_SUFFIXES, parse_columns
from cmath_mer.training.config import TRAIN_PRESETS, TrainConfig, train_preset
from cmath_mer.training.preset_choice import DEFAULT_PRESET, choose_preset
from cmath_mer.training.threads import add_threads_option, apply_threads

CLASS_NAMES_HELP = "comma-separated class names, for a pickle whose classes are not the preset's"


# ------------------------------------------------------------------------------------------ option checks
# A value that was given is used or refused, never replaced by a default (`is None`, never `if args.x`).

def _names_option(option: str, value: str, known: tuple[str, ...] | None = None) -> tuple[str, ...]:
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


def _check_device(device: str, backend: str | None = None) -> str:
    """The device a command runs on (auto resolved), checked once here with the ops' backend on it
    (CMATH_BACKEND too: refused at start rather than at the first step)."""
    from cmath_mer.kernels.backend import check_backend_usable
    from cmath_mer.training.device import check_device
    dev = check_device(device, backend)
    check_backend_usable(backend, dev)
    return str(dev)


def _input_file(option: str, path: str) -> Path:
    if not path:
        raise UsageError(f"{option}: empty path")
    return Path(path)


def _output_file(option: str, path: str, inputs: list[Path] = ()) -> Path:
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


def _loader_options(class_names: str | None, data: str | None = None) -> dict:
    if class_names is None:
        return {}
    names = _names_option("--class-names", class_names)
    if data is not None:
        from .data import file_format
        if data == "synthetic" or data.startswith("synthetic:") and not Path(data).exists():
            raise UsageError("--class-names applies to peer pickles; the synthetic corpus has its preset's classes")
        if Path(data).is_file() and file_format(data) == "safetensors":
            raise UsageError(f"--class-names applies to peer pickles; {data} is a safetensors dataset, which "
                             "carries its own class names")
    return {"class_names": names}


def _load(data: str, preset_name: str, seed: int, class_names: str | None = None):
    from .data import load_dataset, make_synthetic
    options = _loader_options(class_names, data)
    if data == "synthetic":
        return make_synthetic(preset=preset_name, seed=seed)
    return load_dataset(_input_file("--data", data), **options)


def _data_seed(state: dict) -> int:
    """The seed a run's `--data synthetic` corpus was built with: the one its run info records, else (runs
    from before it was recorded) the run's --seed, which a single-seed run builds its corpus with."""
    run = state.get("run") or {}
    if run.get("data_seed") is not None:
        return run["data_seed"]
    return (state.get("train_config") or {}).get("seed", 0)


def _load_for_run(data: str, checkpoint: Path, modalities: tuple[str, ...], class_names: str | None = None):
    """--data of evaluate and predict. 'synthetic' is the run's own synthetic corpus, rebuilt with the preset
    and seed its training built it with, and checked against the run's data fingerprint."""
    from cmath_mer.training.checkpoint import read_metadata
    from cmath_mer.training.run_folder import data_fingerprint

    from .data import DataError
    if data != "synthetic":
        return _load(data, "iemocap", 0, class_names)
    state = read_metadata(checkpoint / "best.safetensors")["state"]
    run = state.get("run") or {}
    seed = _data_seed(state)
    corpus = _load(data, run.get("preset") or "iemocap", seed, class_names)
    trained_on = (state.get("data") or {}).get("sha256")
    if trained_on is not None and data_fingerprint(corpus, modalities)["sha256"] != trained_on:
        raise DataError(f"--data synthetic: the synthetic corpus rebuilt with seed {seed} is not the one the run in "
                        f"{checkpoint} trained on (another SHA-256); save the corpus with `cmath-mer synth` and "
                        f"give its file")
    return corpus


def _train_options(args, devices: bool = True) -> None:
    """Check every training option that was given, before anything is read or written (devices=False:
    those that need no torch, checked before it is imported)."""
    if args.out == "":
        raise UsageError("--out: empty path; name the run folder")
    if args.patience is not None and args.patience < 1:
        raise UsageError(f"--patience {args.patience}: must be at least 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs {args.epochs}: must be at least 1")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a finite number > 0")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    if args.modalities is not None:
        _names_option("--modalities", args.modalities, MODALITIES)
    if args.class_names is not None:
        _names_option("--class-names", args.class_names)
    if args.accumulate is not None and args.accumulate < 1:
        raise UsageError(f"--accumulate {args.accumulate}: must be at least 1")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if not devices:
        return
    device = _check_device(args.device if args.device is not None else "auto", args.backend)
    if args.precision is not None:
        from cmath_mer.training.precision import check_precision
        check_precision(args.precision, device)


def _overrides(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--set: not valid JSON ({err}); e.g. --set '{{\"window\": 32}}'") from None
    except RecursionError:
        raise UsageError("--set: the JSON is nested too deeply") from None
    try:
        return check_overrides(overrides, "--set")
    except ConfigError as err:
        raise UsageError(str(err)) from None


def _resume_settings(args, folder: Path):
    """resume_settings (training/run_folder.py) for the options given on the command line."""
    from cmath_mer.training.run_folder import resume_settings
    given = {key: getattr(args, key) for key in ("lr", "patience", "seed", "preset", "precision", "accumulate",
                                                 "backend", "epochs", "device", "compile", "deterministic",
                                                 "data_on_device", "cuda_graphs", "keep_last")}
    given["modalities"] = None if args.modalities is None else _names_option("--modalities", args.modalities)
    return resume_settings(folder, given, _overrides(args.set), args.out)


def cmd_train(args) -> int:
    """Under torchrun (RANK/WORLD_SIZE in the environment) every process runs this: rank 0 checks the run
    folder and reads a run to resume, every rank reads the data (a rank that cannot stops them all), and
    train() runs the distributed loop."""
    from cmath_mer.training import distributed
    _train_options(args)
    device = _check_device(args.device if args.device is not None else "auto", args.backend)
    try:
        distributed.setup(device, args.dist_backend)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    try:
        return _cmd_train(args, distributed)
    finally:
        distributed.teardown()


def _cmd_train(args, distributed) -> int:
    from cmath_mer.training.prepare import build_config
    from cmath_mer.training.run_folder import check_new_run_folder
    from cmath_mer.training.train import train
    main_rank = distributed.context().main
    out = Path(args.out)
    seeds = None if args.seeds is None else _seed_list(args.seeds)
    if seeds is not None and args.seed is not None:
        raise UsageError("--seed and --seeds contradict each other: give one")
    resume = args.resume
    if resume and seeds is not None:
        from cmath_mer.training.multi_run import check_folder
        from cmath_mer.training.run_folder import run_files
        from cmath_mer.training.seeds import seed_folder
        distributed.on_main(check_folder, out, "seeds", resume=True, overwrite=False)
        begun = [seed_folder(out, s) for s in seeds if run_files(seed_folder(out, s))]
        resume = bool(begun)                  # killed before its first run began: it starts anew
    if resume:
        from cmath_mer.training.run_folder import check_resume, data_fingerprint

        from .data import check_compatible
        # the settings of the seeds' runs: those of the first one begun
        folder = out if seeds is None else begun[0]
        # the run folder is rank 0's: it reads the settings and hands them to the other ranks
        saved, config, tcfg, preset_name, notes = distributed.on_main(_resume_settings, args, folder)
        data_seed = _data_seed(saved.state)
        data = distributed.agree(_load, args.data, preset_name, data_seed, args.class_names)
        check_compatible(data, config)
        distributed.on_main(check_resume, saved, config, tcfg,              # before saying anything
                            data_fingerprint(data, config.modalities))
        if main_rank:
            for note in notes:
                print(note, file=sys.stderr)
    else:
        def check_folders():                                               # before the data is read
            if seeds is None:
                check_new_run_folder(out, overwrite=args.overwrite)
            else:
                from cmath_mer.training.multi_run import check_folder
                check_folder(out, "seeds", resume=False, overwrite=args.overwrite)
        distributed.on_main(check_folders)
        seed = 0 if args.seed is None else args.seed
        overrides = _overrides(args.set)
        if args.backend is not None:
            overrides["backend"] = args.backend
        _check_device(args.device if args.device is not None else "auto", overrides.get("backend"))
        modalities = None if args.modalities is None else _names_option("--modalities", args.modalities)
        # every rank reads the data; one that cannot (a missing or bad file on its machine) stops them all
        data_seed = seed           # a synthetic corpus is built with --seed (under --seeds: for every run)
        data = distributed.agree(_load, args.data, args.preset or DEFAULT_PRESET, data_seed, args.class_names)
        preset_name, preset_why = choose_preset(data, args.preset, args.data)
        config = build_config(data, preset_name, modalities, **overrides)
        given = {"epochs": args.epochs, "lr": args.lr, "patience": args.patience, "precision": args.precision,
                 "accumulate": args.accumulate, "compile": args.compile, "deterministic": args.deterministic,
                 "data_on_device": args.data_on_device, "cuda_graphs": args.cuda_graphs, "keep_last": args.keep_last}
        tcfg = train_preset(preset_name, seed=seed, device=args.device if args.device is not None else "auto",
                            **{k: v for k, v in given.items() if v is not None})
    run_info = {"preset": preset_name, "data": args.data, "data_seed": data_seed,    # evaluate rebuilds synthetic
                "threads": args.thread_choice.as_dict()}
    if not args.resume:
        run_info["preset_why"] = preset_why
    if Path(args.data).is_file():                                      # predict reads its featurize cache
        run_info["data_path"] = str(Path(args.data).resolve())
    try:
        if seeds is not None:
            from cmath_mer.training.seeds import train_seeds
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
    if not main_rank:
        return 0
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
    return 0


def _seed_list(text: str) -> list[int]:
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


def cmd_sweep(args) -> int:
    from cmath_mer.training.multi_run import check_folder
    from cmath_mer.training.sweep import load_grid, run_sweep
    if args.out == "":
        raise UsageError("--out: empty path; name the sweep's folder")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the sweep, or replace it")
    modalities = None if args.modalities is None else _names_option("--modalities", args.modalities, MODALITIES)
    seeds = _seed_list(args.seeds)
    grid = load_grid(_input_file("--grid", args.grid))
    check_folder(args.out, "sweep", resume=args.resume, overwrite=args.overwrite)     # before the data is read
    data = _load(args.data, args.preset, 0, args.class_names)
    run_sweep(data, args.preset, modalities, grid, seeds, args.out, resume=args.resume, overwrite=args.overwrite,
              where=f"--grid {args.grid}", progress=not args.no_progress)
    print(f"wrote {args.out}/sweep.md and sweep.json (one folder per recipe and seed)")
    return 0


def cmd_baseline(args) -> int:
    from cmath_mer.training.baseline import context_free_baseline
    from cmath_mer.training.context_baseline import context_gru_baseline
    from cmath_mer.training.prepare import make_splits
    modalities = None if args.modalities is None else _names_option("--modalities", args.modalities, MODALITIES)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    data = _load(args.data, args.preset, args.seed, args.class_names)
    splits = make_splits(data, TrainConfig.valid_fraction, args.seed)
    result = context_free_baseline(data, splits, modalities)
    result["context_gru"] = context_gru_baseline(data, splits, modalities, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


def _load_for_model(args):
    from cmath_mer.training.ensemble import load_for_prediction, representative

    from .data import check_compatible
    device = _check_device(args.device)
    if args.class_names is not None:
        _names_option("--class-names", args.class_names)
    _input_file("--data", args.data)
    model = load_for_prediction(_input_file("--checkpoint", args.checkpoint), device)
    data = _load_for_run(args.data, representative(Path(args.checkpoint)), model.config.modalities,
                         args.class_names)
    check_compatible(data, model.config)
    return model, data


def _eval_precision(args, device: str) -> str:
    """--precision when given (refused where the device cannot run it); else the run's own training
    precision (fp32 for runs from before --precision, and where this device has no bf16)."""
    from cmath_mer.training.checkpoint import read_metadata
    from cmath_mer.training.ensemble import representative
    from cmath_mer.training.precision import check_precision

    from .errors import ConfigError
    if args.precision is not None:
        return check_precision(args.precision, device)
    state = read_metadata(representative(Path(args.checkpoint)) / "best.safetensors")["state"]
    run = (state.get("train_config") or {}).get("precision") or "fp32"
    try:
        return check_precision(run, device)
    except ConfigError:
        return "fp32"


def cmd_evaluate(args) -> int:
    from cmath_mer.training.evaluate import evaluation_conversations, predict_conversations
    from cmath_mer.training.metrics import classification_metrics

    from .data import DataError
    model, data = _load_for_model(args)
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
    from cmath_mer.files import atomic_write
    from cmath_mer.training.ensemble import load_for_prediction, representative
    from cmath_mer.training.evaluate import predict_conversations

    from .data import check_compatible
    ckpt = _input_file("--checkpoint", args.checkpoint)
    out = _output_file("--out", args.out, [_input_file("--data", args.data), ckpt / "best.safetensors",
                                            ckpt / "config.json", ckpt])
    device = _check_device(args.device)
    if args.class_names is not None:
        _names_option("--class-names", args.class_names)
    model = load_for_prediction(ckpt, device)
    names = model.config.class_names
    corpus = None
    if Path(args.data).suffix.lower() in TABLE_SUFFIXES:
        from .featurize import featurize_for_model
        from .featurize.cache import training_cache
        data, corpus = featurize_for_model(args.data, model.config, checkpoint=args.checkpoint,
                                           cache=training_cache(representative(ckpt)),
                                           text_encoder=args.text_encoder, missing_audio=args.missing_audio,
                                           device=device, progress=not args.no_progress,
                                           **_table_options(args))
    else:
        data = _load_for_run(args.data, representative(ckpt), model.config.modalities, args.class_names)
    check_compatible(data, model.config)
    precision = _eval_precision(args, device)
    y, p, prob = predict_conversations(model, data, list(range(len(data))), precision=precision)   # file order
    bounds = data.cu_seqlens.tolist()
    speaker_map = data.metadata.get("speaker_map")
    transcript = data.metadata.get("transcript")
    rows = []                                      # (position in the input, cells)
    for conv, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        for row in range(start, end):
            speaker = int(data.speakers[row])
            if speaker_map is not None:
                speaker = speaker_map[conv][speaker]
            elif data.speaker_names is not None:
                speaker = data.speaker_names[speaker]
            label = names[y[row]] if y[row] >= 0 else ""
            probs = [f"{x:.4f}" for x in prob[row]]
            if corpus is not None:                 # a table: its own ids and text, in its row order
                u = corpus.utterances[row]
                rows.append((u.position, [u.source_conversation, u.utterance_id, speaker, u.text, label,
                                          names[p[row]], *probs]))
            elif transcript is not None:           # a featurized file: the ids and text it keeps
                rows.append((row, [data.conversation_ids[conv], data.splits[conv], transcript["utterance_ids"][row],
                                   speaker, transcript["texts"][row], label, names[p[row]], *probs]))
            else:
                rows.append((row, [data.conversation_ids[conv], data.splits[conv], row - start, speaker, label,
                                   names[p[row]], *probs]))
    if corpus is not None:
        header = ["conversation", "utterance", "speaker", "text", "label", "prediction"]
    elif transcript is not None:
        header = ["conversation", "split", "utterance", "speaker", "text", "label", "prediction"]
    else:
        header = ["conversation", "split", "utterance", "speaker", "label", "prediction"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*header, *[f"p_{n}" for n in names]])
            w.writerows(cells for _, cells in sorted(rows, key=lambda r: r[0]))
    atomic_write(out, write)                       # the input is never open for writing, even on a crash
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


def cmd_featurize(args) -> int:
    from .featurize import featurize
    if args.device is not None:
        _check_device(args.device)
    data = featurize(args.tables, args.out, split=args.split, **_table_options(args),
                     finetune=_finetune_options(args),
                     class_names=None if args.class_names is None else _names_option("--class-names",
                                                                                     args.class_names),
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
    from cmath_mer.training.device import resolve_device
    from cmath_mer.training.precision import check_precision

    from .featurize import FinetuneOptions
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
    from .data import convert
    src = _input_file("input", args.input)
    out = _output_file("output", args.output, [src])
    convert(src, out, **_loader_options(args.class_names, args.input))
    print(f"wrote {args.output}")
    return 0


def cmd_synth(args) -> int:
    from .data import synth
    if args.conversations < 1:
        raise UsageError(f"--conversations {args.conversations}: must be at least 1")
    if not 1 <= args.min_length <= args.max_length:
        raise UsageError(f"--min-length {args.min_length} / --max-length {args.max_length}: need "
                         "1 <= min <= max")
    synth(_output_file("output", args.output), preset=args.preset, conversations=args.conversations,
          min_length=args.min_length,
          max_length=args.max_length, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


def cmd_bench(args) -> int:
    from cmath_mer.bench import run_benchmarks, sweep
    if args.long:
        run_benchmarks(args.out, quick=args.quick, device=args.device, cases=sweep(args.quick, args.device, long=True),
                       time_budget_s=3600.0)
    else:
        run_benchmarks(args.out, quick=args.quick, device=args.device)
    return 0


NO_PROGRESS_HELP = "no progress bars (for logs)"
DATA_HELP = "a .safetensors or peer .pkl dataset, or 'synthetic' (the run's own synthetic corpus)"
CHECKPOINT_HELP = ("a run folder (train --out), or the folder of train --seeds: then the ensemble of its seeds, "
                   "the mean of their class probabilities")
SYNTHETIC_PRESET_HELP = "the preset of --data synthetic's corpus (default %(default)s)"


def _per_preset(field: str) -> str:
    """'iemocap 8, meld 12': a TrainConfig field as each preset sets it."""
    return ", ".join(f"{name} {getattr(train_preset(name), field):g}" for name in sorted(TRAIN_PRESETS))


def _add_table_options(p, text_help: str) -> None:
    p.add_argument("--layout", default="auto", choices=["auto", "meld", "emorynlp", "generic"],
                   help="table layout (default %(default)s: detected from the header)")
    p.add_argument("--columns", help="role=COLUMN,... for other layouts; roles: conversation, utterance, "
                                     "speaker, text, label, split, audio, visual (A+B: several columns)")
    p.add_argument("--media-root", help="folder that audio/visual paths are relative to and must stay in "
                                        "(default: the table's folder)")
    p.add_argument("--missing-audio", default="error", choices=["error", "zero"],
                   help="a missing or unreadable audio file: stop (error, the default) or use a zero vector "
                        "(zero, counted)")
    p.add_argument("--text-encoder", help=text_help)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cmath-mer")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train CMATH and write a checkpoint folder")
    t.add_argument("--data", default="synthetic", help="a .safetensors or peer .pkl file, or 'synthetic' "
                                                      "(default: %(default)s, the embedded demo corpus)")
    t.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"the model and training recipe (default: the preset whose classes the data has, else "
                        f"{DEFAULT_PRESET}; synthetic:NAME is NAME's); with --resume, the run's own")
    t.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all in the data)")
    t.add_argument("--epochs", type=int, help=f"default: the preset's ({_per_preset('epochs')}); with --resume, "
                                               "the run's own")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default: the preset's, {_per_preset('lr')})")
    t.add_argument("--seed", type=int, help="seed of the run: initialisation, batches, dropout (default 0)")
    t.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2,3,4: one run each in OUT/seed-N, "
                                   "mean and std in OUT/summary.json")
    t.add_argument("--patience", type=int, help="stop after this many epochs without a better validation F1")
    t.add_argument("--device", help="auto (default: cuda when torch sees one, else cpu), cpu, cuda or cuda:N")
    t.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward, fp32 master weights (default: bf16 on CUDA cards that support "
                        "it, fp32 on the CPU; fp16 scales the loss); with --resume, the run's own")
    t.add_argument("--accumulate", type=int, help="split each batch into N micro-batches, gradients accumulated "
                                                  "(same effective batch, less memory); default 1")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (the compile time is reported once)")
    t.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="bitwise-reproducible run on the same machine (torch.use_deterministic_algorithms)")
    t.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the whole corpus on the GPU (no effect on the CPU)")
    t.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each batch shape's training step from a CUDA graph, so the step stops waiting on "
                        "the host; default: on wherever the run can (CUDA, Triton ops, bf16 or TF32 fp32, no "
                        "--accumulate or --compile, one process); --no-cuda-graphs runs every step eagerly")
    t.add_argument("--backend", choices=["torch", "triton", "auto"],
                   help="the ops: torch (reference), triton (fused kernels, CUDA only), auto (triton where it "
                        "runs, else torch); default: the environment's CMATH_BACKEND, else auto")
    t.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="under torchrun: the process group's backend (auto: NCCL on CUDA, Gloo on the CPU)")
    t.add_argument("--set", help='JSON of config overrides, e.g. \'{"window": 32, "g_kd": 0.2}\'')
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out with its own config (--epochs may extend it)")
    t.add_argument("--overwrite", action="store_true", help="replace the run that --out holds (its files are removed)")
    t.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep last.safetensors (weights and optimizer state) when the run finishes, so that "
                        "--resume --epochs N can extend it; default: removed (best.safetensors holds the weights "
                        "evaluate and predict use)")
    t.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    t.add_argument("--class-names", help=CLASS_NAMES_HELP)
    t.set_defaults(func=cmd_train)

    bl = sub.add_parser("baseline", help="the baselines alone: logistic regression on each utterance's "
                                         "features, C chosen on validation; beside it (context_gru) a "
                                         "bidirectional GRU over each conversation, epoch chosen on validation")
    bl.add_argument("--data", required=True, help=DATA_HELP)
    bl.add_argument("--preset", default="iemocap", choices=sorted(PRESETS), help=SYNTHETIC_PRESET_HELP)
    bl.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all)")
    bl.add_argument("--seed", type=int, default=0, help="seed of the validation split (when the data has none)")
    bl.add_argument("--class-names", help=CLASS_NAMES_HELP)
    bl.set_defaults(func=cmd_baseline)

    sw = sub.add_parser("sweep", help="several recipes x several seeds; a table sorted by validation F1")
    sw.add_argument("--data", required=True, help=DATA_HELP)
    sw.add_argument("--preset", default="iemocap", choices=sorted(PRESETS),
                    help="the recipe the grid's overrides start from (default %(default)s)")
    sw.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all)")
    sw.add_argument("--grid", required=True, help='JSON file {name: {"model": {...}, "train": {...}}}')
    sw.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of every recipe (default %(default)s)")
    sw.add_argument("--out", required=True, help="output folder: OUT/<recipe>/seed-N, sweep.md, sweep.json")
    sw.add_argument("--resume", action="store_true",
                    help="continue the interrupted sweep in --out (finished recipes and seeds kept)")
    sw.add_argument("--overwrite", action="store_true", help="replace the sweep that --out holds")
    sw.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    sw.add_argument("--class-names", help=CLASS_NAMES_HELP)
    sw.set_defaults(func=cmd_sweep)

    e = sub.add_parser("evaluate", help="metrics of a trained model on a data file's test split")
    e.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    e.add_argument("--data", required=True, help=DATA_HELP + " (its test split, else every conversation)")
    e.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda:N")
    e.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward (default: the run's training precision)")
    e.add_argument("--class-names", help=CLASS_NAMES_HELP)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="write per-utterance predictions as CSV")
    r.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    r.add_argument("--data", required=True, help=DATA_HELP + ", or a conversation table (.csv, .jsonl) to "
                   "featurize as the training data was")
    r.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda:N")
    r.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward (default: the run's training precision)")
    r.add_argument("--out", required=True, help="the CSV of per-utterance predictions and probabilities to write")
    r.add_argument("--class-names", help=CLASS_NAMES_HELP)
    r.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    _add_table_options(r, text_help="with a table: the local folder of the checkpoint's text encoder, if it "
                                    "was a folder not on this machine (default: the one recorded)")
    r.set_defaults(func=cmd_predict)

    z = sub.add_parser("featurize", help="conversation tables (CSV/JSONL transcripts, audio) -> a dataset file")
    z.add_argument("tables", nargs="+", metavar="TABLE[:SPLIT]",
                   help="CSV or JSONL, one row per utterance; ':train', ':valid' or ':test' gives its split")
    z.add_argument("--out", required=True, help="the .safetensors to write (cache beside it: OUT.cache/)")
    z.add_argument("--split", choices=["train", "valid", "test", "dev"],
                   help="split of rows with neither a ':SPLIT' nor a split column (default train)")
    z.add_argument("--class-names", help="comma-separated classes (default: the layout's, else the sorted labels)")
    z.add_argument("--audio-features", default="eGeMAPSv02", choices=["eGeMAPSv02", "ComParE_2016"],
                   help="openSMILE feature set of an audio column (default %(default)s)")
    z.add_argument("--no-cache", action="store_true", help="neither read nor write OUT.cache/")
    z.add_argument("--batch-size", type=int, default=64, help="sentences per text-encoder batch (default %(default)s)")
    z.add_argument("--device", help="default: cuda when present, else cpu")
    z.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    z.add_argument("--finetune", action="store_true",
                   help="first fine-tune the text encoder as an emotion classifier on the train split (epoch "
                        "chosen on valid; test labels never read); saved as OUT.encoder/ and used for every split")
    z.add_argument("--epochs", type=int, help="--finetune: most epochs (default 3)")
    z.add_argument("--lr", type=float, help="--finetune: the encoder's learning rate (default 5e-5)")
    z.add_argument("--finetune-batch-size", type=int, help="--finetune: utterances per step (default 32)")
    z.add_argument("--max-tokens", type=int, help="--finetune: tokens kept per utterance (default 64)")
    z.add_argument("--patience", type=int, help="--finetune: stop after this many epochs without a better "
                                                "valid weighted F1 (default: run every epoch)")
    z.add_argument("--seed", type=int, help="--finetune: seed of the head, the batches and a carved valid "
                                            "split (default 0)")
    z.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="--finetune: autocast of the "
                                                                         "forward (default fp32)")
    _add_table_options(z, text_help="a local sentence-transformers / Hugging Face model folder "
                                    "(default: the embedded all-MiniLM-L6-v2; with --finetune, the base)")
    z.set_defaults(func=cmd_featurize)

    c = sub.add_parser("convert", help="peer pickle -> the project's safetensors format")
    c.add_argument("input", help="the peer pickle (.pkl)")
    c.add_argument("output", help="the .safetensors to write")
    c.add_argument("--class-names", help=CLASS_NAMES_HELP)
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("synth", help="write a synthetic conversation corpus")
    s.add_argument("output", help="the file to write: .safetensors, or .pkl for a peer pickle")
    s.add_argument("--preset", default="iemocap", choices=sorted(PRESETS),
                   help="classes, widths and speakers of the corpus (default %(default)s)")
    s.add_argument("--conversations", type=int, default=151, help="default %(default)s")
    s.add_argument("--min-length", type=int, default=20,
                   help="utterances per conversation, at least (default %(default)s)")
    s.add_argument("--max-length", type=int, default=110,
                   help="utterances per conversation, at most (default %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="default %(default)s")
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("bench", help="benchmark the ops and the training step; writes results.json, table, plots")
    b.add_argument("--quick", action="store_true", help="small sweep, a few minutes on a 2-core CPU")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default %(default)s")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--long", action="store_true", help="the long-conversation cases instead: windowed attention "
                   "and training step, 65,536 to 1,048,576 utterances (python -m cmath_mer.bench --long has "
                   "more options)")
    b.set_defaults(func=cmd_bench)

    p.description = f"cmath-mer: {', '.join(sub.choices)} (cmath-mer COMMAND --help for each)"
    for sp in (t, bl, sw, e, r, z):
        add_threads_option(sp)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    try:
        _option_values(args)             # usage errors first (exit 2), then missing files (exit 1)
        check_early(args)                                         # before torch is imported
        if "threads" in vars(args):
            args.thread_choice = apply_threads(args.threads)      # before any heavy work
        code = args.func(args)
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


def _option_values(args) -> None:
    """The option values that need neither torch nor the files, checked before anything else: a bad option
    is said (exit 2) even when an input is missing too."""
    _check_int_options(args)
    if args.command == "train":
        _train_options(args, devices=False)
    elif args.command == "featurize":
        tables = [Path(t) for t in args.tables] + [Path(t.rsplit(":", 1)[0]) for t in args.tables if ":" in t]
        _output_file("--out", args.out, tables)
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
        if args.class_names is not None:
            _names_option("--class-names", args.class_names)
    elif args.command == "sweep" and args.modalities is not None:
        _names_option("--modalities", args.modalities, MODALITIES)


MAX_SEED = 2**32 - 1              # the per-epoch and per-step seeds derived from it stay 64-bit integers
MAX_INT = 2**63 - 1


def _check_int_options(args) -> None:
    """An integer option too large for the 64-bit integers it becomes: refused naming the option."""
    for name, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        limit = MAX_SEED if name == "seed" else MAX_INT
        if abs(value) > limit:
            raise UsageError(f"--{name.replace('_', '-')} {value}: too large (at most {limit})")


def _missing_extra_error() -> type[Exception]:
    """featurize's MissingExtraError where featurize was imported (it imports torch), else nothing to catch."""
    extra = sys.modules.get(f"{__package__}.featurize.extra")
    return extra.MissingExtraError if extra is not None else UsageError


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        what = {28: "no space left on the device"}.get(err.errno, err.strerror or str(err))
        return f"{err.filename}: {what}"
    text = " ".join(str(err).split())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
