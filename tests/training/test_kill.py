"""kill -9 at seeded moments of a short training: after every kill the run folder is empty or
loadable (evaluate and --resume can use it), and --resume finishes the run with the metrics of an
uninterrupted one. Kill moments are progress markers seen in the folder (a temporary file being written,
a checkpoint or metrics.json replaced) plus a seeded delay, or a seeded delay after the start: polling the
folder, not fixed sleeps, so a slow shared machine shifts the moments but not what they hit."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from cmath_mer.data import make_synthetic, save_dataset
from cmath_mer.training.evaluate import load_trained
from cmath_mer.training.run_folder import run_files, saved_run

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CMATH_BACKEND": "torch"}
TINY = json.dumps({"d_model": 16, "n_heads": 2, "n_layers": 1, "d_hidden": 16})
EPOCHS = 8
ROUNDS = 4


def launch(data: Path, out: Path, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "cmath_mer", "train", "--preset", "iemocap",
            "--data", str(data), "--out", str(out), "--no-progress"]
    argv += ["--resume"] if resume else ["--epochs", str(EPOCHS), "--set", TINY]
    return subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def mtimes(out: Path) -> dict[str, int]:
    found = {}
    for p in (out.iterdir() if out.is_dir() else ()):
        try:
            found[p.name] = p.stat().st_mtime_ns
        except FileNotFoundError:       # a temporary file renamed between the listing and the stat
            pass
    return found


def wait_for(marker: str, proc: subprocess.Popen, out: Path, delay: float, deadline: float = 120.0) -> bool:
    """Poll until `marker` happens in `out` (then sleep `delay`); False if the process ended first."""
    start, before = time.monotonic(), mtimes(out)
    while proc.poll() is None and time.monotonic() - start < deadline:
        now = mtimes(out)
        if marker == "start":
            hit = time.monotonic() - start >= delay
        elif marker == "tmp":
            hit = any(n.endswith(".tmp") for n in now)
        else:
            hit = marker in now and now[marker] != before.get(marker)
        if hit:
            if marker != "start":
                time.sleep(delay)
            return proc.poll() is None
        time.sleep(0.002)
    return False


def assert_empty_or_loadable(out: Path, why: str) -> bool:
    """True if the folder holds a run (then evaluate's loader and --resume's reader accept it)."""
    if not run_files(out):
        return False
    load_trained(out)                              # CheckpointError here = a run left unusable
    run = saved_run(out)
    assert run.state["epoch"] >= 1, why
    return True


def test_kill_9_at_seeded_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "d.safetensors"
    save_dataset(make_synthetic(None, input_dims={"text": 12, "audio": 10, "visual": 6}, num_classes=4,
                                conversations=24, min_length=4, max_length=14, seed=3), data)
    ref = subprocess.run([sys.executable, "-m", "cmath_mer", "train", "--preset", "iemocap",
                          "--data", str(data), "--out",
                          str(tmp_path / "ref"), "--epochs", str(EPOCHS), "--set", TINY, "--no-progress"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr

    rng = random.Random(int(os.environ.get("CMATH_KILL_SEED", "14")))
    out = tmp_path / "run"
    log = []
    for i in range(ROUNDS):
        # the first round may die before any checkpoint; the later ones die while epochs are being written
        marker = rng.choice(["start", "tmp", "best.safetensors"] if i == 0 else
                            ["tmp", "tmp", "last.safetensors", "metrics.json"])
        delay = rng.uniform(1.0, 5.0) if marker == "start" else rng.uniform(0.0, 0.02)
        resume = bool(run_files(out))
        proc = launch(data, out, resume)
        killed = wait_for(marker, proc, out, delay)
        if killed:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        if not killed:
            assert proc.returncode == 0, err
        state = "run" if assert_empty_or_loadable(out, f"round {i}") else "empty"
        log.append((marker, round(delay, 3), resume, killed, state))

    final = subprocess.run([sys.executable, "-m", "cmath_mer", "train", "--preset", "iemocap",
                            "--data", str(data), "--out", str(out),
                            "--no-progress"] + (["--resume"] if run_files(out) else ["--epochs", str(EPOCHS),
                                                                                      "--set", TINY]),
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, (final.stderr, log)
    assert not list(out.glob(".*.tmp")), log
    strip = lambda m: {**m, "history": [{k: v for k, v in r.items() if k != "utterances_per_second"}
                                        for r in m["history"]]}
    got = strip(json.loads((out / "metrics.json").read_text()))
    want = strip(json.loads((tmp_path / "ref" / "metrics.json").read_text()))
    assert got == want, log
    assert sum(k for *_, k, _ in log) >= ROUNDS // 2, log         # most rounds did end in a kill
    assert any(r for _, _, r, _, _ in log), log                    # and some kill was resumed from
    print(log)
