"""kill -9 at seeded moments of `train --seeds` and `sweep` (the harness of test_kill.py, over the whole
multi-run folder): after every kill the same command with --resume (or, before any run began, without it)
continues, and the finished folder holds the runs and the summary of an uninterrupted one."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmath_mer.data import make_synthetic, save_dataset
from cmath_mer.training.multi_run import MARKER, read_marker

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMATH_BACKEND": "torch"}
TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16}
ROUNDS = 3


def argv(command: str, data: Path, out: Path, grid: Path) -> list[str]:
    if command == "seeds":
        return ["train", "--preset", "iemocap",
                "--data", str(data), "--out", str(out), "--seeds", "0,1", "--epochs", "3", "--set",
                json.dumps(TINY), "--no-progress"]
    return ["sweep", "--data", str(data), "--grid", str(grid), "--out", str(out), "--seeds", "0,1", "--no-progress"]


def mtimes(out: Path) -> dict[str, int]:
    """Modification times of everything under `out` (a temporary folder removed while it is walked is skipped)."""
    found = {}
    for folder, _, names in os.walk(out):            # os.walk skips a folder that vanishes under it
        for name in names:
            p = Path(folder) / name
            try:
                found[str(p.relative_to(out))] = p.stat().st_mtime_ns
            except FileNotFoundError:
                pass
    return found


def wait_for(marker: str, proc: subprocess.Popen, out: Path, delay: float, deadline: float = 180.0) -> bool:
    """Poll until `marker` happens anywhere under `out` (then sleep `delay`); False if the process ended."""
    start, before = time.monotonic(), mtimes(out)
    while proc.poll() is None and time.monotonic() - start < deadline:
        now = mtimes(out)
        if marker == "start":
            hit = time.monotonic() - start >= delay
        elif marker == "tmp":
            hit = any(".tmp" in n for n in now)
        else:
            hit = any(n.endswith(marker) and now[n] != before.get(n) for n in now)
        if hit:
            if marker != "start":
                time.sleep(delay)
            return proc.poll() is None
        time.sleep(0.002)
    return False


def begun(out: Path) -> bool:
    """Something the same command must continue with --resume (not start anew)."""
    marker = read_marker(out) if (out / MARKER).exists() else None
    return marker is not None and any((out / c).is_dir() and any(
        p.name.endswith(".safetensors") or p.name == MARKER for p in (out / c).rglob("*")) for c in marker["children"])


def without_speed(metrics: dict) -> dict:
    return {**metrics, "history": [{k: v for k, v in r.items() if k != "utterances_per_second"}
                                   for r in metrics["history"]]}


@pytest.mark.parametrize("command", ["seeds", "sweep"])
def test_kill_9_of_a_multi_run_then_resume_equals_an_uninterrupted_one(tmp_path, command):
    data = tmp_path / "d.safetensors"
    save_dataset(make_synthetic(None, input_dims={"text": 12, "audio": 10, "visual": 6}, num_classes=4,
                                conversations=16, min_length=4, max_length=12, seed=3), data)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"a": {"model": TINY, "train": {"epochs": 2}},
                                "b": {"model": {**TINY, "class_weights": False}, "train": {"epochs": 2}}}))
    ref = subprocess.run([sys.executable, "-m", "cmath_mer", *argv(command, data, tmp_path / "ref", grid)],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr

    rng = random.Random(int(os.environ.get("CMATH_KILL_SEED", "26")) + (command == "sweep"))
    out, log = tmp_path / "out", []
    for i in range(ROUNDS):
        marker = rng.choice(["start", "tmp"] if i == 0 else ["tmp", "last.safetensors", "metrics.json",
                                                             "summary.json"])
        delay = rng.uniform(1.0, 6.0) if marker == "start" else rng.uniform(0.0, 0.02)
        resume = begun(out)
        proc = subprocess.Popen([sys.executable, "-m", "cmath_mer", *argv(command, data, out, grid)]
                                + (["--resume"] if resume else []), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        killed = wait_for(marker, proc, out, delay)
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
        if not killed:
            assert proc.returncode == 0, (err, log)
        log.append((marker, round(delay, 3), resume, killed))
    final = subprocess.run([sys.executable, "-m", "cmath_mer", *argv(command, data, out, grid)]
                           + (["--resume"] if begun(out) else []), env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, (final.stderr, log)
    runs = sorted(str(p.relative_to(tmp_path / "ref")) for p in (tmp_path / "ref").rglob("metrics.json"))
    assert runs == sorted(str(p.relative_to(out)) for p in out.rglob("metrics.json")), log
    for run in runs:
        got, want = (json.loads((root / run).read_text()) for root in (out, tmp_path / "ref"))
        assert without_speed(got) == without_speed(want), (run, log)
    summary = "summary.json" if command == "seeds" else "sweep.json"
    assert json.loads((out / summary).read_text()) == json.loads((tmp_path / "ref" / summary).read_text()), log
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], log
    assert sum(k for *_, k in log) >= 2, log
    print(log)
