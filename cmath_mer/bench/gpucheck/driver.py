"""The stage table, each stage in its own process with its own time limit, summary.md, and the command line."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from cmath_mer.bench.gpucheck import graphs, parity, runs, targets
from cmath_mer.bench.gpucheck.common import as_text, write_json

# (name, what it checks, time limit, least time worth starting it with under --budget), seconds on one H100.
# The least time is about what the stage took there (benchmarks/results/2026-11-26-h100, runs 1-4): with less
# left it would surely time out and save nothing; a stage that saves its rows as it goes (targets, bench) may
# start with less and keep what it reached.
STAGES = [
    ("env", "torch, triton, CUDA, driver and card; nvidia-smi", 30, 10),                          # 4-6 s
    ("parity", "the three ops on CUDA against float64: fp32 (exact path), fp32 with TF32, fp16, bf16; "
               "forward and every gradient, odd lengths", 150, 60),                                # 43 s
    ("autotune_cold", "a fresh process: the first call of every autotune key equals the reference "
                      "(stale partial sums), and every config run in sequence on the same buffers", 60, 30),  # 18 s
    ("determinism", "ops and a model training step in two fresh processes: bitwise equal", 60, 40),   # 29 s
    ("cuda_graph", "one whole training step (bf16 autocast, Triton ops, AdamW) captured in a CUDA graph; "
                   "replays equal eager steps", 90, 50),                             # 12 s, 42.2 s cold cache
    ("graph_train", "--cuda-graphs: graphed steps equal eager ones (two shapes, a new seed and lr each step; "
                    "a recomputed long batch with dropout), step times, and the demo trained both ways",
     180, 130),                                                         # 117 s before the recomputed batch
    ("profile", "torch.profiler over train.py's step (Triton ops, bf16): where the time goes, host syncs",
     60, 30),                                                                                       # 25 s
    ("targets", "the speed targets: the whole step at 4,096 utterances (eager fp32 and torch.compile references "
                "against ours, bf16), and idle gaps between steps in a trace of train.py's loop on 16 x ~100",
     300, 60),        # two cold inductor compiles of the whole step (53-58 s each on a 2-core CPU, warm cache)
    ("train_demo", "the synthetic demo for 3 epochs on both backends; the loss curves agree", 100, 80),  # 72 s
    ("bench", "ops, model and engine step, torch/SDPA/Triton, and the device's copy and matmul ceilings",
     130, 40),                                                                                      # 55 s
]
STAGE_NAMES = [s[0] for s in STAGES]


# ------------------------------------------------------------------------------------------------ driver

def run_stage(name: str, args) -> dict:
    module = next(m for m in (parity, graphs, runs, targets) if hasattr(m, f"stage_{name}"))
    return getattr(module, f"stage_{name}")(args)


def run_with_limit(cmd: list[str], limit_s: float) -> tuple[int | None, str, str]:
    """(returncode, None when stopped at the limit; stdout; stderr) of a stage's process. The stage runs in a
    session of its own and at its limit the whole process group is killed: subprocess.run's timeout kills only
    the stage, and what it started (a demo training run, parity or determinism workers) would go on using the
    GPU under the next stages."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=limit_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            code = None
        finally:
            # also what a stage that crashed left running (its workers), and on SIGTERM (as SystemExit) or
            # Ctrl-C to the driver: neither reaches the stage's own session
            _kill_group(proc)
    return code, as_text(out), as_text(err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)      # its own session: the group id is its pid
    except ProcessLookupError:
        pass                                      # the group ended meanwhile


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)                # so that run_with_limit kills the running stage's group


def _summary_md(out: Path, results: dict) -> str:
    env = results.get("env", {})
    lines = [f"# GPU check, {results['started']}", "",
             f"{env.get('gpu', 'CPU')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA "
             f"{env.get('cuda')}", "", "| stage | result | seconds | checks |", "| --- | --- | --- | --- |"]
    for name, what, _, _ in STAGES:
        r = results.get(name)
        if r is not None:
            lines.append(f"| {name} | {_verdict(r)} | {r.get('seconds', 0):.0f} | {what} |")
    if results.get("rerun"):
        lines += ["", f"Not finished (TIMEOUT or SKIPPED), for a second call: `--stages {','.join(results['rerun'])}`"]
    par = results.get("parity", {})
    if par.get("rows"):
        lines += ["", "## Parity (worst relative error vs float64, per case)", "",
                  "| op | mode | shape | worst | tol | ok |", "| --- | --- | --- | --- | --- | --- |"]
        for r in par["rows"]:
            shape = {k: r[k] for k in ("lengths", "S", "H", "D", "window", "T", "M", "K", "C", "Z", "sample")
                     if k in r}
            lines.append(f"| {r['op']} | {r['mode']} | {shape} | {r.get('worst', r.get('error'))} | "
                         f"{r.get('tol')} | {r.get('ok')} |")
    lines += targets.summary_lines(targets.with_verdicts(results.get("targets", {}), results.get("device")))
    return "\n".join(lines) + "\n"


def _verdict(r: dict) -> str:
    return ("PASS" if r.get("ok") else "TIMEOUT" if r.get("timeout") else
            "SKIPPED" if r.get("skipped") else "FAIL")


def _save(out: Path, results: dict) -> None:
    # what a second call should run, in this call's order (gpu_session.sh prints it)
    results["rerun"] = [n for n, r in results.items() if n in STAGE_NAMES and _verdict(r) in ("TIMEOUT", "SKIPPED")]
    write_json(out / "summary.json", results)
    (out / "summary.md").write_text(_summary_md(out, results))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmath_mer.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default benchmarks/results/<date>-<card>)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset, in order")
    p.add_argument("--dry-run", action="store_true", help="print the plan and check it, run nothing")
    p.add_argument("--jobs", type=int, default=8, help="parity worker processes")
    p.add_argument("--bench-budget", type=float, default=95.0, help="seconds for the bench cases")
    p.add_argument("--budget", type=float, help="seconds for the whole run (a device lease): each stage's limit "
                                                "is cut to what is left, and a stage with less left than the "
                                                "least time it needs (the plan's 'min') is SKIPPED")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-deadline", type=float, help=argparse.SUPPRESS)  # the stage's, time.time() seconds
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGE_NAMES}")
    if args.dry_run:
        for name, what, limit, least in STAGES:
            if name in stages:
                print(f"{name:14s} {limit:4d} s (min {least:3d} s)  {what}")
        print(f"plan: {len(parity.parity_cases('cuda'))} parity cases on CUDA, "
              f"{len(runs.bench_cases('cuda'))} bench cases, {len(targets.step_rows('cuda'))} target step rows")
        print(f"total limit: {sum(s[2] for s in STAGES if s[0] in stages)} s")
        return 0
    if args.stage:                                     # inside a stage's process
        res = run_stage(args.stage, args)
        if args.worker is None:
            print("RESULT " + json.dumps(res, default=str))
        return 0
    if args.out is None:
        card = (torch.cuda.get_device_name(0).split()[1].lower() if args.device == "cuda" else "cpu")
        args.out = f"benchmarks/results/{_dt.date.today().isoformat()}-{card}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run_stages(stages, args, out)
    finally:
        signal.signal(signal.SIGTERM, previous)


def stage_command(name: str, args, out: Path, deadline: float) -> list[str]:
    return [sys.executable, "-m", "cmath_mer.gpucheck", "--stage", name, "--device", args.device,
            "--out", str(out),
            "--jobs", str(args.jobs), "--bench-budget", str(args.bench_budget), "--stage-deadline", str(deadline)]


def run_stages(stages: list[str], args, out: Path) -> int:
    results = dict(started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), device=args.device)
    # the limits are sized for one H100; the interpreter on a CPU runs the small cases slower
    scale = 1 if args.device == "cuda" else 4
    limits = {n: lim * scale for n, _, lim, _ in STAGES}
    least = {n: m * scale for n, _, _, m in STAGES}
    deadline = None if args.budget is None else time.perf_counter() + args.budget
    for name in stages:
        t0 = time.perf_counter()
        if deadline is not None:
            left = deadline - t0
            if left < least[name]:
                results[name] = dict(ok=False, skipped=True, seconds=0.0,
                                     error=f"not started: {max(left, 0):.0f} s of the --budget left, "
                                           f"it needs about {least[name]} s")
                print(f"{name:14s} SKIPPED (budget)", flush=True)
                _save(out, results)
                continue
            limits[name] = min(limits[name], int(left))
        # the stage's deadline in wall-clock time: the processes it starts stop before it (common.seconds_left)
        cmd = stage_command(name, args, out, time.time() + limits[name])
        code, stdout, stderr = run_with_limit(cmd, limits[name])
        (out / f"{name}.log").write_text(stdout[-200000:] + "\n--- stderr ---\n" + stderr[-200000:])
        if code is None:
            res = dict(ok=False, timeout=True, error=f"over its {limits[name]} s limit")
            partial = out / name / "results.json"          # what a stage saved as it went (bench, targets)
            if partial.exists():
                res["partial"] = json.loads(partial.read_text())
        else:
            got = [ln[7:] for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(got[-1]) if got else dict(ok=False, error=f"exit {code}: {stderr[-1500:]}")
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        write_json(out / f"{name}.json", res)
        print(f"{name:14s} {_verdict(res)}  {res['seconds']:6.1f} s", flush=True)
        _save(out, results)
    return 0 if all(results[n].get("ok") for n in stages) else 1
