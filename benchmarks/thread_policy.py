"""The CPU thread policy (cmath_mer/training/threads.py) against fixed thread counts: one training run as users start
it, `cmath-mer train` in a fresh process, with the default policy, `--threads 1` and `--threads 2`, on the
machine as it is ("idle": nothing started by this script) and with a background CPU load (busy processes
started by this script, one per usable CPU unless --load-processes says otherwise).

    python benchmarks/thread_policy.py --data meld_minilm.safetensors --out RESULTS_FOLDER [--rounds 2]
        [-- extra train options, default: --preset meld --modalities text]

Runs alternate default, 1, 2 within each round, so drift in the machine's other work spreads over all three.
Each run records its wall time, the 1-minute load average before and after, the thread count and reason the
run's data line states, and the test weighted F1 (the thread count must not change the numbers much).
Writes RESULTS_FOLDER/results.json with the machine; OMP_NUM_THREADS and MKL_NUM_THREADS are removed from the
runs' environment (they would decide instead of the policy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cmath_mer.bench.machine import machine_info
from cmath_mer.training.threads import usable_cpus

SETTINGS = {"default": [], "1": ["--threads", "1"], "2": ["--threads", "2"]}
THREADS_NOTE = re.compile(r", (\d+) CPU threads \(([^)]*)\)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def one_run(data: str, setting: str, extra: list[str], condition: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cmath_mer", "train", "--data", data, "--out", f"{tmp}/run", "--no-progress",
               *extra, *SETTINGS[setting]]
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        note = THREADS_NOTE.search(proc.stdout)
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())["selected_by_validation"]
    row = {"condition": condition, "setting": setting, "wall_s": round(wall, 1),
           "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
           "threads": int(note.group(1)) if note else None, "why": note.group(2) if note else None,
           "test_weighted_f1": metrics["weighted_f1"]}
    print(json.dumps(row), flush=True)
    return row


def start_load(n: int, settle_s: float) -> list[subprocess.Popen]:
    """n busy processes; waits until the load average shows them (up to settle_s), as it would for any
    long-running work the policy meets."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < settle_s and os.getloadavg()[0] < 0.8 * n:
        time.sleep(5)
    return procs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--load-processes", type=int, default=usable_cpus())
    p.add_argument("--settle", type=float, default=120.0, help="seconds to wait for the load average")
    p.add_argument("extra", nargs="*", default=["--preset", "meld", "--modalities", "text"])
    args = p.parse_args()
    rows = []
    for condition in ("idle", "loaded"):
        load = start_load(args.load_processes, args.settle) if condition == "loaded" else []
        try:
            for _ in range(args.rounds):
                for setting in SETTINGS:
                    rows.append(one_run(args.data, setting, args.extra, condition))
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info("cpu"), "python": platform.python_version(), "usable_cpus": usable_cpus(),
              "load_processes": args.load_processes, "train_options": args.extra, "runs": rows}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
