"""The argparse definitions of every command; the help of an option with a preset-dependent default is
generated from the presets, so it cannot drift from what the code does."""
from __future__ import annotations

import argparse

from cmath_mer.model.config import PRESETS
from cmath_mer.training.config import TRAIN_PRESETS, train_preset
from cmath_mer.training.preset_choice import DEFAULT_PRESET
from cmath_mer.training.threads import add_threads_option

CLASS_NAMES_HELP = "comma-separated class names, for a pickle whose classes are not the preset's"
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


def _add_folder_options(p, out: str, resume: str, overwrite: str) -> None:
    """The options of a command that writes a folder of runs (train, sweep): where, continue or replace it."""
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--overwrite", action="store_true", help=overwrite)


def _train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train CMATH and write a checkpoint folder")
    p.add_argument("--data", default="synthetic", help="a .safetensors or peer .pkl file, or 'synthetic' "
                                                      "(default: %(default)s, the embedded demo corpus)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"the model and training recipe (default: the preset whose classes the data has, and "
                        f"data of no preset's classes is refused; 'synthetic' is {DEFAULT_PRESET}'s, synthetic:NAME "
                        f"NAME's); with --resume, the run's own")
    p.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all in the data)")
    p.add_argument("--epochs", type=int, help=f"default: the preset's ({_per_preset('epochs')}); with --resume, "
                                               "the run's own")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: the preset's, {_per_preset('lr')})")
    p.add_argument("--seed", type=int, help="seed of the run: initialisation, batches, dropout (default 0)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2,3,4: one run each in OUT/seed-N, "
                                   "mean and std in OUT/summary.json")
    p.add_argument("--patience", type=int, help="stop after this many epochs without a better validation F1")
    p.add_argument("--device", help="auto (default: cuda when torch sees one, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward, fp32 master weights (default: bf16 on CUDA cards that support "
                        "it, fp32 on the CPU; fp16 scales the loss); with --resume, the run's own")
    p.add_argument("--accumulate", type=int, help="split each batch into N micro-batches, gradients accumulated "
                                                  "(same effective batch, less memory); default 1")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (the compile time is reported once)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="bitwise-reproducible run on the same machine (torch.use_deterministic_algorithms)")
    p.add_argument("--data-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the whole corpus on the GPU (no effect on the CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each batch shape's training step from a CUDA graph, so the step stops waiting on "
                        "the host; default: on wherever the run can (CUDA, Triton ops, bf16 or TF32 fp32, no "
                        "--accumulate or --compile, one process); --no-cuda-graphs runs every step eagerly")
    p.add_argument("--backend", choices=["torch", "triton", "auto"],
                   help="the ops: torch (reference), triton (fused kernels, CUDA only), auto (triton where it "
                        "runs, else torch); default: the environment's CMATH_BACKEND, else auto")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                   help="under torchrun: the process group's backend (auto: NCCL on CUDA, Gloo on the CPU)")
    p.add_argument("--set", help='JSON of config overrides, e.g. \'{"window": 32, "g_kd": 0.2}\'')
    _add_folder_options(p, out="output folder",
                        resume="continue the interrupted run in --out with its own config (--epochs may extend it)",
                        overwrite="replace the run that --out holds (its files are removed)")
    p.add_argument("--keep-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep last.safetensors (weights and optimizer state) when the run finishes, so that "
                        "--resume --epochs N can extend it; default: removed (best.safetensors holds the weights "
                        "evaluate and predict use)")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    return p


def _baseline_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("baseline", help="the baselines alone: logistic regression on each utterance's "
                                        "features, C chosen on validation; beside it (context_gru) a "
                                        "bidirectional GRU over each conversation, epoch chosen on validation")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--preset", default="iemocap", choices=sorted(PRESETS), help=SYNTHETIC_PRESET_HELP)
    p.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (when the data has none)")
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    return p


def _sweep_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="several recipes x several seeds; a table sorted by validation F1")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--preset", default="iemocap", choices=sorted(PRESETS),
                   help="the recipe the grid's overrides start from (default %(default)s)")
    p.add_argument("--modalities", help="comma-separated subset of text,audio,visual (default: all)")
    p.add_argument("--grid", required=True, help='JSON file {name: {"model": {...}, "train": {...}}}')
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds of every recipe (default %(default)s)")
    _add_folder_options(p, out="output folder: OUT/<recipe>/seed-N, sweep.md, sweep.json",
                        resume="continue the interrupted sweep in --out (finished recipes and seeds kept)",
                        overwrite="replace the sweep that --out holds")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    return p


def _evaluate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="metrics of a trained model on a data file's test split")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP + " (its test split, else every conversation)")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda:N")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward (default: the run's training precision)")
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    return p


def _predict_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="write per-utterance predictions as CSV")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", required=True, help=DATA_HELP + ", or a conversation table (.csv, .jsonl) to "
                   "featurize as the training data was")
    p.add_argument("--device", default="auto", help="auto (cuda when torch sees one, else cpu), cpu, cuda:N")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="autocast of the forward (default: the run's training precision)")
    p.add_argument("--out", required=True, help="the CSV of per-utterance predictions and probabilities to write")
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    _add_table_options(p, text_help="with a table: the local folder of the checkpoint's text encoder, if it "
                                    "was a folder not on this machine (default: the one recorded)")
    return p


def _featurize_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("featurize", help="conversation tables (CSV/JSONL transcripts, audio) -> a dataset file")
    p.add_argument("tables", nargs="+", metavar="TABLE[:SPLIT]",
                   help="CSV or JSONL, one row per utterance; ':train', ':valid' or ':test' gives its split")
    p.add_argument("--out", required=True, help="the .safetensors to write (cache beside it: OUT.cache/)")
    p.add_argument("--split", choices=["train", "valid", "test", "dev"],
                   help="split of rows with neither a ':SPLIT' nor a split column (default train)")
    p.add_argument("--class-names", help="comma-separated classes (default: the layout's, else the sorted labels)")
    p.add_argument("--audio-features", default="eGeMAPSv02", choices=["eGeMAPSv02", "ComParE_2016"],
                   help="openSMILE feature set of an audio column (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write OUT.cache/")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per text-encoder batch (default %(default)s)")
    p.add_argument("--device", help="default: cuda when present, else cpu")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("--finetune", action="store_true",
                   help="first fine-tune the text encoder as an emotion classifier on the train split (epoch "
                        "chosen on valid; test labels never read); saved as OUT.encoder/ and used for every split")
    p.add_argument("--epochs", type=int, help="--finetune: most epochs (default 3)")
    p.add_argument("--lr", type=float, help="--finetune: the encoder's learning rate (default 5e-5)")
    p.add_argument("--finetune-batch-size", type=int, help="--finetune: utterances per step (default 32)")
    p.add_argument("--max-tokens", type=int, help="--finetune: tokens kept per utterance (default 64)")
    p.add_argument("--patience", type=int, help="--finetune: stop after this many epochs without a better "
                                                "valid weighted F1 (default: run every epoch)")
    p.add_argument("--seed", type=int, help="--finetune: seed of the head, the batches and a carved valid "
                                            "split (default 0)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="--finetune: autocast of the "
                                                                         "forward (default fp32)")
    _add_table_options(p, text_help="a local sentence-transformers / Hugging Face model folder "
                                    "(default: the embedded all-MiniLM-L6-v2; with --finetune, the base)")
    return p


def _convert_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="peer pickle -> the project's safetensors format")
    p.add_argument("input", help="the peer pickle (.pkl)")
    p.add_argument("output", help="the .safetensors to write")
    p.add_argument("--class-names", help=CLASS_NAMES_HELP)
    return p


def _synth_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("synth", help="write a synthetic conversation corpus")
    p.add_argument("output", help="the file to write: .safetensors, or .pkl for a peer pickle")
    p.add_argument("--preset", default="iemocap", choices=sorted(PRESETS),
                   help="classes, widths and speakers of the corpus (default %(default)s)")
    p.add_argument("--conversations", type=int, default=151, help="default %(default)s")
    p.add_argument("--min-length", type=int, default=20,
                   help="utterances per conversation, at least (default %(default)s)")
    p.add_argument("--max-length", type=int, default=110,
                   help="utterances per conversation, at most (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    return p


def _bench_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark the ops and the training step; writes results.json, table, plots")
    p.add_argument("--quick", action="store_true", help="small sweep, a few minutes on a 2-core CPU")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default %(default)s")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--long", action="store_true", help="the long-conversation cases instead: windowed attention "
                   "and training step, 65,536 to 1,048,576 utterances (python -m cmath_mer.bench --long has "
                   "more options)")
    return p


# the commands that do heavy work: they take --threads
_THREADED = ("train", "baseline", "sweep", "evaluate", "predict", "featurize")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each help text that states a default takes it from the code."""
    p = argparse.ArgumentParser(prog="cmath-mer")
    sub = p.add_subparsers(dest="command", required=True)
    for make in (_train_parser, _baseline_parser, _sweep_parser, _evaluate_parser, _predict_parser,
                 _featurize_parser, _convert_parser, _synth_parser, _bench_parser):
        make(sub)
    p.description = f"cmath-mer: {', '.join(sub.choices)} (cmath-mer COMMAND --help for each)"
    for name in _THREADED:
        add_threads_option(sub.choices[name])
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p
