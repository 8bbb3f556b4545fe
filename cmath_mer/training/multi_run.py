"""Folders of several runs: `train --seeds` (OUT/seed-N run folders and summary.json) and `sweep`
(OUT/<recipe>/ --seeds folders, sweep.md and sweep.json). They follow the single run's contract
(run_folder.py): the folder is new or empty, or one of theirs (a marker file says so and lists the
subfolders it made); --resume continues it, --overwrite replaces what it wrote and nothing else; one
process writes into it at a time (the lock); the user's own files are never replaced, and a multi-run
folder is never put inside a single run's folder."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from cmath_mer.errors import RunFolderError
from cmath_mer.files import SAFETENSORS_TMP, TMP_SUFFIX, atomic_write_text, remove_temporary
from cmath_mer.training.run_folder import LOCK_NAME, RunLock, clear_run, is_temporary, run_files

MARKER = ".cmath-mer-runs.json"
KINDS = {"seeds": ("train --seeds", ("summary.json",)), "sweep": ("sweep", ("sweep.md", "sweep.json"))}


def read_marker(out: Path) -> dict | None:
    """The folder's marker ({kind, children}), None when it has none; RunFolderError when it is damaged."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RunFolderError(f"{path}: not a readable marker of a multi-run folder ({err})") from None
    if not (isinstance(marker, dict) and marker.get("kind") in KINDS and isinstance(marker.get("children"), list)
            and all(isinstance(c, str) for c in marker["children"])):
        raise RunFolderError(f"{path}: not a readable marker of a multi-run folder (expected "
                             f"{{\"kind\": \"seeds\" or \"sweep\", \"children\": [names]}})")
    return marker


def _is_temporary(name: str, files: tuple[str, ...]) -> bool:
    return (name.endswith(TMP_SUFFIX) and any(name.startswith(f".{f}.") for f in files + (MARKER,))
            or SAFETENSORS_TMP.fullmatch(name) is not None)


def check_folder(out: str | Path, kind: str, *, resume: bool, overwrite: bool) -> dict | None:
    """Refuse (RunFolderError, usage) a folder this multi-run may not use; return its marker (None: new or
    empty). Reads, writes nothing."""
    out = Path(out)
    command, files = KINDS[kind]
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file, not a folder", usage=True)
    if not out.exists():
        marker = None
    else:
        single = run_files(out)
        if single:
            raise RunFolderError(f"--out {out}: the folder holds a single training run ({', '.join(single[:3])}); "
                                 f"`{command}` writes its runs into a folder of their own: choose another --out",
                                 usage=True)
        marker = read_marker(out)
        if marker is not None and marker["kind"] != kind:
            raise RunFolderError(f"--out {out}: the folder holds the runs of `{KINDS[marker['kind']][0]}`, not of "
                                 f"`{command}`; choose another --out", usage=True)
        ours = {LOCK_NAME, MARKER, *files, *marker["children"]} if marker else {LOCK_NAME}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not _is_temporary(p.name, files))
        if foreign:
            raise RunFolderError(f"--out {out}: the folder is not empty and is not a `{command}` folder (it holds "
                                 f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); choose a new or "
                                 f"empty folder", usage=True)
    if marker is not None and not _begun(out, marker):
        # killed before any run began: nothing to continue, so it starts anew, with or without --resume
        return None
    if marker is None and resume:
        raise RunFolderError(f"--resume: {out} holds no `{command}` runs (nothing to resume)", usage=True)
    if marker is not None and not (resume or overwrite):
        raise RunFolderError(f"--out {out}: the folder already holds `{command}` runs "
                             f"({', '.join(marker['children'][:3]) or 'none finished'}); continue them with --resume, "
                             f"or pass --overwrite to replace them", usage=True)
    return marker


def _remove_ours(folder: Path) -> None:
    """Remove what a run or a multi-run wrote into `folder`, and the folder if nothing else is left in it
    (what the user put there stays)."""
    if not folder.is_dir():
        return
    marker = read_marker(folder)
    files = KINDS[marker["kind"]][1] if marker is not None else ()
    if marker is not None:
        for child in marker["children"]:
            _remove_ours(folder / child)
        for f in files:
            (folder / f).unlink(missing_ok=True)
    else:
        clear_run(folder)
    for p in folder.iterdir():
        if is_temporary(p.name) or _is_temporary(p.name, files):
            remove_temporary(p)
    (folder / MARKER).unlink(missing_ok=True)
    if not any(p.name != LOCK_NAME for p in folder.iterdir()):
        shutil.rmtree(folder)


@contextlib.contextmanager
def open_folder(out: str | Path, kind: str, children: list[str], *, resume: bool, overwrite: bool):
    """Hold the lock on `out` while the body trains into it: checked again under the lock, replaced
    (--overwrite: what it wrote before is removed), its temporaries removed, and marked as this kind's
    with `children` (the subfolders it will write) before any of them is written."""
    out = Path(out)
    with RunLock(out):
        marker = check_folder(out, kind, resume=resume, overwrite=overwrite)
        if marker is not None and overwrite:
            for child in marker["children"]:
                _remove_ours(out / child)
            for f in KINDS[kind][1]:
                (out / f).unlink(missing_ok=True)
            marker = None
        else:
            marker = read_marker(out)        # one of a start killed before any run began: its folders are ours
        for p in out.iterdir():
            if _is_temporary(p.name, KINDS[kind][1]):
                remove_temporary(p)
        known = marker["children"] if marker else []
        atomic_write_text(out / MARKER, json.dumps({"kind": kind, "children": known + [
            c for c in children if c not in known]}) + "\n")
        yield


def _begun(out: Path, marker: dict) -> bool:
    return any(child_begun(out / c) for c in marker["children"]) or any(
        (out / f).exists() for f in KINDS[marker["kind"]][1])


def child_begun(folder: Path) -> bool:
    """A subfolder that holds something to continue: a run (checkpoints), or a multi-run in which a run began
    (a marker alone, written by a multi-run killed before its first run, holds nothing to continue)."""
    if run_files(folder):
        return True
    marker = read_marker(Path(folder)) if (Path(folder) / MARKER).is_file() else None
    return marker is not None and _begun(Path(folder), marker)

