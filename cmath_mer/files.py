"""Files written atomically: a crash leaves the old file or the new one, never a torn one, and a write that runs
out of space is one line naming the file and the space needed. Every file the package writes (datasets,
checkpoints, caches, run files, reports) goes through atomic_write."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
# what safetensors' save_file writes before renaming it to the name it was given (Rust's tempfile crate)
SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def atomic_write(path: Path, write, needed: int | None = None) -> None:
    """Call write(tmp_path) on a file in a temporary folder beside `path`, fsync it, then rename it over
    `path`: a crash leaves either the old file or the new one, never a torn one (and at worst a stale
    `.NAME.*.tmp` folder, which run folders clean at start). The folder also holds what a writer makes
    beside its file (safetensors' own `.tmpXXXXXX`), so a kill leaves nothing else behind."""
    path = Path(path)
    folder = None
    try:
        folder = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        tmp = os.path.join(folder, path.name)
        write(tmp)
        # a writer may make it 0600 (safetensors replaces the file): the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        full = _write_error(path, err, needed)
        if full is None:
            raise
        raise full from None
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class WriteError(OSError):
    """A file that could not be written for want of space (a full device, a file-size limit, a quota)."""


_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "the file is larger than the file-size "
         "limit (ulimit -f)", errno.EDQUOT: "the disk quota is exceeded"}


def _write_error(path: Path, err: BaseException, needed: int | None) -> WriteError | None:
    """The one-line error of a write that ran out of space (OSError, or safetensors' error carrying the OS
    error number); None for any other failure."""
    number = err.errno if isinstance(err, OSError) else None
    found = re.search(r"os error (\d+)", str(err))
    if number is None and found:
        number = int(found.group(1))
    if number not in _FULL:
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    size = f"about {needed / 2**20:,.1f} MiB needed, " if needed else ""
    return WriteError(f"{path}: not written: {_FULL[number]} ({size}{free}); nothing was replaced")


def remove_temporary(path: Path) -> None:
    """Remove a temporary that a killed writer left (a file, or atomic_write's folder)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def bytes_needed(tensors: dict, meta: dict) -> int:
    """About the size of a safetensors file of `tensors` and `meta`."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(meta)) + 200 * len(tensors)
