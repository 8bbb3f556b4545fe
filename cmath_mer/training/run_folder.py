"""A training run's folder: one writer at a time (a lock), no silent overwrite, no stale temporaries, and
`--resume` only of the same run on the same data.

What a run folder holds (train.py writes it): last.safetensors (weights, optimizer state, weight average:
what training continues from) and best.safetensors (the weights evaluation uses), each with the model
config, the training config, the data fingerprint and the history in its metadata; config.json and
train_config.json (readable copies, written after the first checkpoint), metrics.json and
confusion_matrix.png. Every file is written atomically, and last.safetensors is written first, so a kill at
any moment leaves either no run or one that `evaluate` and `--resume` can use. A finished run removes
last.safetensors (unless --keep-last: then --resume --epochs can extend it), and the lock file goes with
the process that held it.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from cmath_mer.errors import CheckpointError, RunFolderError, UsageError
from cmath_mer.files import SAFETENSORS_TMP, TMP_SUFFIX, remove_temporary
from cmath_mer.model.config import config_from_dict, config_to_dict
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.config import TrainConfig

RUN_FILES = ("best.safetensors", "last.safetensors", "config.json", "train_config.json", "metrics.json",
             "confusion_matrix.png", "training_curves.png")
CHECKPOINTS = ("last.safetensors", "best.safetensors")
LOCK_NAME = ".cmath-mer.lock"
# TrainConfig fields a resumed run may change: more epochs, another device, and how the device runs it
# (compiled or not, deterministic algorithms or not, the corpus on the device or not, CUDA graphs or not, how
# many processes: the step's batch is the same for any number), whether last.safetensors is kept; never the
# precision or the accumulation, which are part of the run's numbers
RESUMABLE_CHANGES = ("epochs", "device", "compile", "deterministic", "data_on_device", "cuda_graphs", "world_size",
                     "keep_last")


# --------------------------------------------------------------------------------------- data fingerprint

def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def data_fingerprint(data, modalities: tuple[str, ...]) -> dict:
    """What identifies the training data: a SHA-256 over the packed tensors the model reads (features of
    `modalities`, speakers, labels, conversation boundaries), the class names, the conversation ids and
    their split assignment; with counts and the source for messages."""
    h = hashlib.sha256()
    tensors = [("cu_seqlens", data.cu_seqlens.to(torch.int64)), ("labels", data.labels.to(torch.int64)),
               ("speakers", data.speakers.to(torch.int64))]
    tensors += [(f"features.{m}", data.features[m]) for m in modalities if m in data.features]
    for name, t in tensors:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(tensor_bytes(t))
    for name, values in (("class_names", data.class_names), ("conversation_ids", data.conversation_ids),
                         ("splits", data.splits)):
        h.update(f"{name}:{len(values)};".encode())
        for v in values:
            h.update(str(v).encode() + b"\0")
    return {"sha256": h.hexdigest(), "source": str(data.source), "conversations": len(data),
            "utterances": int(data.cu_seqlens[-1]) if len(data) else 0}


# ----------------------------------------------------------------------------------------------- the lock

class RunLock:
    """An exclusive advisory lock (flock) on OUT/.cmath-mer.lock, held while a process writes into the run
    folder. The kernel drops it when the process dies (kill -9 included), so it never goes stale. The holder
    removes the file when it is done (a killed one leaves it, harmless: the next run takes it); a process that
    locked a file just removed finds the name gone, or bound to another file, and locks again."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        out = self.out
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out}: is a file, not a folder", usage=True)
        while True:
            try:
                out.mkdir(parents=True, exist_ok=True)
                fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise RunFolderError(f"--out {out}: cannot write into the folder ({err.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunFolderError(f"--out {out}: another process (pid {holder}) is training into this folder; "
                                     f"wait for it to finish or choose another --out") from None
            if _same_file(fd, out / LOCK_NAME):
                break
            os.close(fd)                      # its holder removed it as we opened it: lock the current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if _same_file(self.fd, self.out / LOCK_NAME):        # removed while held, so no one waits on it
                (self.out / LOCK_NAME).unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


# --------------------------------------------------------------------------------------- folder contents

def is_temporary(name: str) -> bool:
    """A temporary of checkpoint.atomic_write (.NAME.XXXXXXXX.tmp) for a file a run writes, or one that
    safetensors writes beside its file (.tmpXXXXXX: a run folder is the run's, so it is the run's)."""
    return (name.endswith(TMP_SUFFIX) and any(name.startswith(f".{f}.") for f in RUN_FILES)
            or SAFETENSORS_TMP.fullmatch(name) is not None)


def clean_temporaries(out: Path) -> list[str]:
    """Remove temporaries a killed writer left behind (call with the lock held)."""
    removed = []
    for p in Path(out).iterdir():
        if is_temporary(p.name):
            remove_temporary(p)
            removed.append(p.name)
    return removed


def run_files(out: Path) -> list[str]:
    out = Path(out)
    return [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() else []


def foreign_entries(out: Path) -> list[str]:
    """Entries of the folder that a run does not write (a folder holding them is not a run folder)."""
    if not Path(out).is_dir():
        return []
    return sorted(p.name for p in Path(out).iterdir()
                  if p.name not in RUN_FILES and p.name != LOCK_NAME and not is_temporary(p.name))


def check_new_run_folder(out: str | Path, *, overwrite: bool) -> None:
    """Refuse (RunFolderError, usage) a folder that is a file, holds a run (unless overwrite) or holds
    anything else. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a folder", usage=True)
    foreign = foreign_entries(out)
    if foreign:
        raise RunFolderError(f"--out {out}: the folder is not empty and is not a run folder (it holds "
                             f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or "
                             f"empty folder", usage=True)
    present = run_files(out)
    if present and not overwrite:
        raise RunFolderError(f"--out {out}: the folder already holds a run ({', '.join(present)}); continue it "
                             f"with --resume, or pass --overwrite to replace it", usage=True)


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (call with the lock held)."""
    for f in RUN_FILES:
        p = Path(out) / f
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- resume

@dataclasses.dataclass
class SavedRun:
    checkpoint: Path            # the checkpoint to continue from (the one with the most epochs)
    config: object              # CMATHConfig
    state: dict                 # training state in the checkpoint's metadata
    train_config: dict | None   # the TrainConfig the run was started with (None for old checkpoints)
    trainable: bool = True      # the checkpoint holds the optimizer state (best.safetensors holds weights only)


def saved_run(out: str | Path) -> SavedRun:
    """The run in `out` to resume: of last.safetensors and best.safetensors, the readable one that holds
    the most epochs, last on a tie (runs from before best was weights-only may hold best without last).
    Reads, writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a folder", usage=True)
    found, problems = [], []
    for name in CHECKPOINTS:
        path = out / name
        if not path.exists():
            continue
        try:
            meta = read_metadata(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        found.append((int(meta["state"].get("epoch", 0)), name == "last.safetensors", path, meta))
    if not found:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise RunFolderError(f"--resume: {out} holds no checkpoint to resume (nothing to resume){why}", usage=True)
    _, _, path, meta = max(found, key=lambda f: (f[0], f[1]))
    if meta["config"] is not None:
        config = config_from_dict(meta["config"], f"{path} (metadata 'config')")
    else:                                                    # checkpoints from before configs were embedded
        from cmath_mer.model.config import load_config
        config = load_config(out / "config.json")
    return SavedRun(path, config, meta["state"], meta["state"].get("train_config"), meta["param_groups"] is not None)


def patience_ran_out(state: dict, patience: int | None) -> bool:
    """`patience` epochs since the validation-selected one: the run stops (a resumed one too)."""
    best = state.get("best_valid")
    return (patience is not None and best is not None and best.get("valid") is not None
            and state["epoch"] - best["epoch"] >= patience)


def check_resume(saved: SavedRun, config, tcfg, fingerprint: dict) -> None:
    """Refuse (RunFolderError) to resume with another config, other training settings or other data."""
    mine, theirs = config_to_dict(config), config_to_dict(saved.config)
    if mine != theirs:
        diff = [k for k in theirs if mine.get(k) != theirs.get(k)]
        raise RunFolderError(f"--resume: the run in {saved.checkpoint.parent} was trained with another config "
                             f"({', '.join(f'{k}: {theirs[k]!r} there, {mine.get(k)!r} here' for k in diff[:3])})",
                             usage=True)
    if saved.train_config is not None:
        now = dataclasses.asdict(tcfg)
        diff = [k for k, v in saved.train_config.items() if k not in RESUMABLE_CHANGES and now.get(k) != v]
        if diff:
            raise RunFolderError("--resume: the run was trained with other settings "
                                 "(" + ", ".join(f"{k}: {saved.train_config[k]!r} there, {now.get(k)!r} here"
                                                 for k in diff) + ")",
                                 usage=True)
    done = int(saved.state.get("epoch", 0))
    if tcfg.epochs < done:
        raise RunFolderError(f"--resume: the run already has {done} epochs; --epochs {tcfg.epochs} cannot shorten "
                             f"it", usage=True)
    if not saved.trainable and tcfg.epochs > done and not patience_ran_out(saved.state, tcfg.patience):
        raise RunFolderError(f"--resume: the run in {saved.checkpoint.parent} finished after {done} epochs and "
                             f"removed last.safetensors (the optimizer state): {saved.checkpoint.name} holds weights "
                             f"only; a finished run can be extended when it was trained with --keep-last. Start a "
                             f"new run (--overwrite or another --out)", usage=True)
    had = saved.state.get("data")
    if had is not None and had.get("sha256") != fingerprint["sha256"]:
        raise RunFolderError(f"--resume: the data differ from the run's: it was trained on {had.get('source')} "
                             f"({had.get('conversations')} conversations, {had.get('utterances')} utterances), "
                             f"this is {fingerprint['source']} ({fingerprint['conversations']} conversations, "
                             f"{fingerprint['utterances']} utterances); resume with the same data")


# options a resumed run may change (said in a note) and the TrainConfig fields they set
RESUMABLE_OPTIONS = (("--compile", "compile"), ("--deterministic", "deterministic"),
                     ("--data-on-device", "data_on_device"), ("--cuda-graphs", "cuda_graphs"),
                     ("--keep-last", "keep_last"))


def resume_settings(folder: Path, given: dict, overrides: dict, out: str):
    """The run's own config and training settings for --resume: `given` (option name -> value, None when not
    given) may not contradict the run (UsageError listing every clash); --epochs (extend), --device and the
    RESUMABLE_OPTIONS are applied and said. Returns (saved run, config, TrainConfig, preset, notes)."""
    saved = saved_run(folder)
    config = saved.config
    tsaved = dict(saved.train_config or json.loads((Path(folder) / "train_config.json").read_text()))
    run = saved.state.get("run") or {}
    have = config_to_dict(config)
    tsaved.setdefault("precision", "fp32")          # runs from before --precision trained in fp32
    clashes = [f"--set {key}={json.dumps(value)} (the run has {json.dumps(have.get(key))})"
               for key, value in overrides.items() if json.loads(json.dumps(value)) != have.get(key)]
    theirs = {"modalities": config.modalities, "backend": config.backend, "lr": tsaved.get("lr"),
              "patience": tsaved.get("patience"), "seed": tsaved.get("seed"), "precision": tsaved["precision"],
              "accumulate": tsaved.get("accumulate", 1), "preset": run.get("preset")}
    for key, has in theirs.items():
        value = given.get(key)
        if value is None or (key == "preset" and has is None) or value == has:
            continue
        shown = ",".join(value) if key == "modalities" else value
        had = ",".join(has) if key == "modalities" else has
        clashes.append(f"--{key} {shown} (the run has {had})")
    if clashes:
        raise UsageError(f"--resume continues the run in {out} with its own settings; these options "
                         f"contradict it: {'; '.join(clashes)}. Drop them, or start a new run (--overwrite or "
                         f"another --out)")
    notes = []
    if given.get("epochs") is not None and given["epochs"] != tsaved["epochs"]:
        notes.append(f"--resume: training to {given['epochs']} epochs (the run was set to {tsaved['epochs']})")
        tsaved["epochs"] = given["epochs"]
    if given.get("device") is not None and given["device"] != tsaved.get("device"):
        notes.append(f"--resume: continuing on {given['device']} (the run trained on {tsaved.get('device')})")
        tsaved["device"] = given["device"]
    for option, key in RESUMABLE_OPTIONS:
        value = given.get(key)
        if value is not None and value != tsaved.get(key, False):
            notes.append(f"--resume: {option} {'on' if value else 'off'} from here on (the run had it "
                         f"{'on' if tsaved.get(key, False) else 'off'})")
            tsaved[key] = value
    return saved, config, TrainConfig(**tsaved), run.get("preset") or given.get("preset") or "iemocap", notes
