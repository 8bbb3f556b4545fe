"""`cmath-mer` command line: train, evaluate, predict, featurize, convert, synth, bench."""
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


TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson")      # conversation tables: predict featurizes them first


def _columns(text: str | None) -> dict[str, str]:
    """'text=transcript,conversation=Season+Episode' -> {'text': 'transcript', ...}"""
    out = {}
    for item in filter(None, (text or "").split(",")):
        role, sep, column = item.partition("=")
        if not sep or not role.strip() or not column.strip():
            raise ValueError(f"--columns {text!r}: expected role=COLUMN,... (e.g. text=transcript)")
        out[role.strip()] = column.strip()
    return out


def _table_options(args) -> dict:
    return {"layout": args.layout, "columns": _columns(args.columns), "media_root": args.media_root}


def cmd_predict(args) -> int:
    from .data import check_compatible
    from .train import load_trained, predict_conversations
    model = load_trained(args.checkpoint, args.device)
    names = model.config.class_names
    corpus = None
    if Path(args.data).suffix.lower() in TABLE_SUFFIXES:
        from .featurize import featurize_for_model
        data, corpus = featurize_for_model(args.data, model.config, checkpoint=args.checkpoint,
                                           text_encoder=args.text_encoder, missing_audio=args.missing_audio,
                                           device=args.device, progress=not args.no_progress,
                                           **_table_options(args))
    else:
        data = _load(args.data, "iemocap", 0, args.class_names)
    check_compatible(data, model.config)
    y, p, prob = predict_conversations(model, data, list(range(len(data))))      # file order
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
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*header, *[f"p_{n}" for n in names]])
        w.writerows(cells for _, cells in sorted(rows, key=lambda r: r[0]))
    print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def cmd_featurize(args) -> int:
    from .featurize import featurize
    data = featurize(args.tables, args.out, split=args.split, **_table_options(args),
                     class_names=tuple(args.class_names.split(",")) if args.class_names else None,
                     text_encoder=args.text_encoder, audio_features=args.audio_features,
                     missing_audio=args.missing_audio, cache=not args.no_cache, device=args.device,
                     batch_size=args.batch_size, progress=not args.no_progress)
    splits = {s: len(data.indices(s)) for s in ("train", "valid", "test") if data.indices(s)}
    print(f"wrote {args.out}: {len(data)} conversations ({', '.join(f'{n} {s}' for s, n in splits.items())}), "
          f"{int(data.cu_seqlens[-1])} utterances, "
          + ", ".join(f"{m} {d}" for m, d in data.input_dims.items()) + " dims, "
          f"{data.num_classes} classes, up to {data.num_speakers} speakers per conversation")
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
    from .benchmark import run_benchmarks
    run_benchmarks(args.out, quick=args.quick, device=args.device)
    return 0


def _add_table_options(p, text_help: str) -> None:
    p.add_argument("--layout", default="auto", choices=["auto", "meld", "emorynlp", "generic"],
                   help="table layout (default: detected from the header)")
    p.add_argument("--columns", help="role=COLUMN,... for other layouts; roles: conversation, utterance, "
                                     "speaker, text, label, split, audio, visual (A+B: several columns)")
    p.add_argument("--media-root", help="folder that audio/visual paths are relative to and must stay in "
                                        "(default: the table's folder)")
    p.add_argument("--missing-audio", default="error", choices=["error", "zero"],
                   help="a missing or unreadable audio file: stop (default) or use a zero vector (counted)")
    p.add_argument("--text-encoder", help=text_help)


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
    r.add_argument("--no-progress", action="store_true")
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
    z.add_argument("--audio-features", default="eGeMAPSv02", choices=["eGeMAPSv02", "ComParE_2016"])
    z.add_argument("--no-cache", action="store_true", help="neither read nor write OUT.cache/")
    z.add_argument("--batch-size", type=int, default=64, help="sentences per text-encoder batch")
    z.add_argument("--device", help="default: cuda when present, else cpu")
    z.add_argument("--no-progress", action="store_true")
    _add_table_options(z, text_help="a local sentence-transformers / Hugging Face model folder "
                                    "(default: the embedded all-MiniLM-L6-v2)")
    z.set_defaults(func=cmd_featurize)

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
    b.set_defaults(func=cmd_bench)

    args = p.parse_args(argv)
    from .data import DataError
    from .featurize.extra import MissingExtraError
    try:
        return args.func(args)
    except (DataError, ValueError, FileNotFoundError, MissingExtraError) as err:
        print(f"cmath-mer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
