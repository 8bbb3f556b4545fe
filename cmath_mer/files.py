"""Files written atomically: a crash leaves the old file or the new one, never a torn one. Every file the
package writes (datasets, checkpoints, caches, run files, reports) goes through atomic_write."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file in the same folder, fsync it, then rename over `path`:
    a crash leaves either the old file or the new one, never a torn one (and at worst a stale
    `.NAME.*.tmp`, which run folders clean at start)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may replace the file, e.g. safetensors): the usual permissions
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
