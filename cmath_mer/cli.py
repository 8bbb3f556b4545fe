"""`cmath-mer` command line: train, evaluate, predict, convert, synth, bench."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from .config import PRESETS, TrainConfig

CLASS_NAMES_HELP = "comma-separated class names, for a pickle whose classes are not the preset's"


def _loader_options(class_names: str | None) -> dict:
    return {"class_names": tuple(class_names.split(","))} if class_names else {}


def _load(data: str, preset_name: str, seed: int, class_names: str | None = None):
    from .data import load_dataset, make_synthetic
    if data == "synthetic":
        return make_synthetic(preset=preset_name, seed=seed)
    return load_dataset(data, **_loader_options(class_names))


def cmd_train(args) -> int:
    from .config import load_config
    from .train import build_config, train
    out = Path(args.out)
    if args.resume:
        # the run's own config and training settings; --epochs may extend it
        config = load_config(out / "config.json")
        saved = json.loads((out / "train_config.json").read_text())
        tcfg = TrainConfig(**{**saved, **({"epochs": args.epochs} if args.epochs else {})})
        data = _load(args.data, args.preset, tcfg.seed, args.class_names)
    else:
        data = _load(args.data, args.preset, args.seed, args.class_names)
        overrides = json.loads(args.set) if args.set else {}
        if args.backend:
            overrides["backend"] = args.backend
        modalities = tuple(args.modalities.split(",")) if args.modalities else None
        config = build_config(data, args.preset, modalities, **overrides)
        tcfg = TrainConfig(epochs=args.epochs or TrainConfig.epochs, seed=args.seed, device=args.device,
                           **({"lr": args.lr} if args.lr else {}))
    try:
        metrics = train(data, config, tcfg, out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last finished epoch is saved in {out}. Continue with:\n"
              f"  cmath-mer train --data {args.data} --out {out} --resume", file=sys.stderr)
        return 130
    sel, best = metrics["selected_by_validation"], metrics["best_test_epoch"]
    if sel["weighted_f1"] is not None:
        print(f"test weighted F1 {sel['weighted_f1']:.2f}  accuracy {sel['accuracy']:.2f}  "
              f"(epoch {sel['epoch']}, selected on validation)")
    if best:
        print(f"best test epoch {best['epoch']}: weighted F1 {best['weighted_f1']:.2f}  accuracy "
              f"{best['accuracy']:.2f}  (peers' protocol, for comparison only)")
    print(f"wrote {out}/config.json, best.safetensors, last.safetensors, metrics.json, confusion_matrix.png")
    return 0


def cmd_evaluate(args) -> int:
    from .data import check_compatible
    from .metrics import classification_metrics
    from .train import evaluation_conversations, load_trained, predict_conversations
    model = load_trained(args.checkpoint, args.device)
    data = _load(args.data, "iemocap", 0, args.class_names)
    check_compatible(data, model.config)
    y, p, _ = predict_conversations(model, data, evaluation_conversations(data))
    metrics = classification_metrics(y, p, data.class_names)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .data import check_compatible
    from .train import load_trained, predict_conversations
    model = load_trained(args.checkpoint, args.device)
    data = _load(args.data, "iemocap", 0, args.class_names)
    check_compatible(data, model.config)
    names = model.config.class_names
    y, p, prob = predict_conversations(model, data, list(range(len(data))))      # file order
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["conversation", "split", "utterance", "speaker", "label", "prediction",
                    *[f"p_{n}" for n in names]])
        bounds = data.cu_seqlens.tolist()
        for conv, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            for row in range(start, end):
                speaker = int(data.speakers[row])
                if data.speaker_names is not None:
                    speaker = data.speaker_names[speaker]
                w.writerow([data.conversation_ids[conv], data.splits[conv], row - start, speaker,
                            names[y[row]] if y[row] >= 0 else "", names[p[row]], *[f"{x:.4f}" for x in prob[row]]])
    rows = bounds[-1]
    print(f"wrote {rows} predictions to {args.out}")
    return 0


def cmd_convert(args) -> int:
    from .data import convert
    convert(args.input, args.output, **_loader_options(args.class_names))
    print(f"wrote {args.output}")
    return 0


def cmd_synth(args) -> int:
    from .data import synth
    synth(args.output, preset=args.preset, conversations=args.conversations, min_length=args.min_length,
          max_length=args.max_length, seed=args.seed)
    print(f"wrote {args.output}")
    return 0


def cmd_bench(args) -> int:
    from .benchmark import run_benchmarks, sweep
    if args.long:
        run_benchmarks(args.out, quick=args.quick, device=args.device, cases=sweep(args.quick, args.device, long=True),
                       time_budget_s=3600.0)
    else:
        run_benchmarks(args.out, quick=args.quick, device=args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cmath-mer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train CMATH and write a checkpoint folder")
    t.add_argument("--data", default="synthetic", help="a .safetensors or peer .pkl file, or 'synthetic'")
    t.add_argument("--preset", default="iemocap", choices=sorted(PRESETS))
    t.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all in the data)")
    t.add_argument("--epochs", type=int, help=f"default {TrainConfig.epochs}; with --resume, the run's own")
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--backend", choices=["torch", "triton", "auto"])
    t.add_argument("--set", help='JSON of config overrides, e.g. \'{"window": 32, "g_kd": 0.2}\'')
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out with its own config (--epochs may extend it)")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--class-names", help=CLASS_NAMES_HELP)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a trained model on a data file's test split")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--device", default="cpu")
    e.add_argument("--class-names", help=CLASS_NAMES_HELP)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("predict", help="write per-utterance predictions as CSV")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--out", required=True)
    r.add_argument("--class-names", help=CLASS_NAMES_HELP)
    r.set_defaults(func=cmd_predict)

    c = sub.add_parser("convert", help="peer pickle -> the project's safetensors format")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--class-names", help=CLASS_NAMES_HELP)
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("synth", help="write a synthetic conversation corpus")
    s.add_argument("output")
    s.add_argument("--preset", default="iemocap", choices=sorted(PRESETS))
    s.add_argument("--conversations", type=int, default=151)
    s.add_argument("--min-length", type=int, default=20)
    s.add_argument("--max-length", type=int, default=110)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("bench", help="benchmark the ops and the training step; writes results.json, table, plots")
    b.add_argument("--quick", action="store_true", help="small sweep, a few minutes on a 2-core CPU")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--out", required=True)
    b.add_argument("--long", action="store_true", help="the long-conversation cases instead: windowed attention "
                   "and training step, 65,536 to 1,048,576 utterances (python -m cmath_mer.benchmark --long has "
                   "more options)")
    b.set_defaults(func=cmd_bench)

    args = p.parse_args(argv)
    from .data import DataError
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"cmath-mer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
