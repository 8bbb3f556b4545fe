"""`run_benchmarks`: every case of a sweep in its own subprocess (so one case's memory, allocator state or
crash never touches another), within per-case time and memory budgets, then the report.

A case that would exceed the per-case time or memory budget (extrapolated from the previous length of
the same series) is skipped with the reason recorded; a case that fails records the error; a backend the
machine cannot run is recorded as unavailable with the reason, found without starting a subprocess.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from cmath_mer.bench.attention import SDPA, unavailable_reason
from cmath_mer.bench.build import build_case
from cmath_mer.bench.calls import Unavailable, elem_size
from cmath_mer.bench.cases import (
    COMPILED_BACKENDS,
    H_HEADS,
    REC_K,
    REC_M,
    VAR_C,
    VAR_Z,
    case_id,
    case_lengths,
    series_key,
    sweep,
)
from cmath_mer.bench.machine import available_bytes, load_average, machine_info, measure_ceilings
from cmath_mer.bench.report import progress_line, write_json, write_report


def run_benchmarks(out_dir, quick: bool = False, device: str = "cpu", *, cases: list[dict] | None = None,
                   time_budget_s: float | None = None, progress: bool = True, append: bool = False,
                   note: str | None = None) -> dict:
    """Run the sweep; write out_dir/results.json, results.md and the PNG plots. Returns the results dict.
    append: keep the rows of an earlier out_dir/results.json (a long sweep run in several sittings); a case
    run again replaces its old row, and each sitting's time and load average are listed under `sittings`."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("cmath-mer bench: --device cuda but torch sees no CUDA device")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases = sweep(quick, device) if cases is None else cases
    time_budget = time_budget_s or (300.0 if quick else 600.0)
    t_start = time.perf_counter()
    results = dict(
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device, quick=quick, machine=machine_info(device),
        ceilings=measure_ceilings(device, quick),
        settings=dict(per_case_time_budget_s=time_budget, attention_heads=H_HEADS,
                      reconstruction_K_M=[REC_K, REC_M], variational_C_Z=[VAR_C, VAR_Z],
                      model="iemocap preset (d_model 256, 8 heads, 2 CMA layers, 3 modalities)"),
        rows=[],
    )
    if note:
        results["note"] = note
    if append and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
        again = {case_id(c) for c in cases}
        results["rows"] = [r for r in earlier["rows"] if case_id(r) not in again]
        results.setdefault("note", earlier.get("note"))
        results["sittings"] = earlier.get("sittings", [dict(timestamp=earlier["timestamp"],
                                                            machine=earlier["machine"])])
    last: dict[tuple, dict] = {}
    probes: dict[tuple, str | None] = {}
    for i, case in enumerate(cases):
        key = series_key(case)
        mem_budget = 0.6 * available_bytes(device)
        why = _predicted_skip(case, last.get(key), time_budget, mem_budget)
        probe = _probe_unavailable(case, probes)
        if probe:
            row = dict(case, status="unavailable", reason=probe)
        elif why:
            row = dict(case, status="skipped", reason=why)
        else:
            # a hard timeout a bit above the budget: setup and (for compile) the compile count too
            row = _run_in_subprocess(case, quick, timeout_s=time_budget * 2.5 + 60)
        last[key] = row
        results["rows"].append(row)
        if progress:
            print(progress_line(i, len(cases), row), flush=True)
        write_json(results, out / "results.json")                # partial results survive an interrupt
    results["total_s"] = time.perf_counter() - t_start
    load = load_average()
    if load is not None:
        results["machine"]["loadavg_at_end"] = load
    if "sittings" in results:
        results["sittings"].append(dict(timestamp=results["timestamp"], machine=results["machine"],
                                        cases=len(cases), total_s=results["total_s"]))
    write_report(results, out)
    if progress:
        print(f"wrote {out}/results.json, results.md and plots in {results['total_s']:.0f} s")
    return results


def _run_in_subprocess(case: dict, quick: bool, timeout_s: float) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "cmath_mer.bench", "--worker"] + (["--quick"] if quick else [])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, input=json.dumps(case), capture_output=True, text=True, timeout=timeout_s,
                           env=env)
    except subprocess.TimeoutExpired:
        return dict(case, status="skipped", reason=f"exceeded the per-case time budget: killed after "
                                                   f"{timeout_s:.0f} s (the hard limit, 2.5 x budget + 60 s, "
                                                   "covers setup and compile)", wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            row = json.loads(line)
            row["wall_s"] = wall
            return row
    tail = (p.stderr or p.stdout or "").strip().splitlines()[-3:]
    why = "killed by the OS (out of memory?)" if p.returncode in (-9, 137) else " | ".join(tail)[:400]
    return dict(case, status="error", reason=f"worker exited {p.returncode}: {why}", wall_s=wall)


def _growth(case: dict) -> tuple[float, float]:
    """(time exponent, memory exponent) in N for extrapolating the next case of a series."""
    op = case["op"]
    if op in ("attention", "train_step", "inference", "engine_step"):
        return 2.0, (2.0 if case["backend"] == "sdpa_math" else 1.0)
    return 1.0, 1.0


def _predicted_skip(case: dict, last: dict | None, time_budget: float, mem_budget: float) -> str | None:
    if case["op"] == "attention" and case["backend"] == "sdpa_math":
        lengths = case_lengths(case)
        scores = len(lengths) * H_HEADS * max(lengths) * case["S"] * max(lengths) * elem_size(case["dtype"])
        need = scores * (3 if case["mode"] != "fwd" else 1)
        if need > mem_budget:
            return (f"predicted memory {need / 2**30:.1f} GiB (the math backend materialises the "
                    f"{len(lengths)}x{H_HEADS}x{max(lengths)}x{case['S'] * max(lengths)} score matrix) "
                    f"> budget {mem_budget / 2**30:.1f} GiB")
    if not last or last.get("status") != "ok":
        if last and last.get("status") in ("skipped",) and "budget" in last.get("reason", ""):
            return f"a shorter length of this series already exceeded its budget (N={last['N']})"
        return None
    ratio = case["N"] / last["N"]
    pt, pm = _growth(case)
    calls = 1 + (1 if case["backend"].endswith("_compile") or case["backend"] in COMPILED_BACKENDS else 0)
    t_pred = last.get("first_call_s", last["median_s"]) * ratio ** pt * calls
    if t_pred > time_budget:
        return (f"predicted {t_pred:.0f} s (extrapolated from {last['median_s']:.3g} s at N={last['N']}) "
                f"> per-case time budget {time_budget:.0f} s")
    m_pred = last.get("peak_mem_bytes", 0) * ratio ** pm
    if m_pred > mem_budget:
        return (f"predicted peak memory {m_pred / 2**30:.1f} GiB > budget {mem_budget / 2**30:.1f} GiB")
    return None


def _probe_unavailable(case: dict, probes: dict) -> str | None:
    """Whether the backend can run at all here, so that an unavailable kernel costs no subprocess: the known
    rules (Triton and varlen on CUDA only, flex without a backward on a CPU), then for SDPA and varlen a tiny
    in-process call, once per backend and batch kind."""
    if case["backend"].startswith("triton") and case["device"] != "cuda":
        return "triton is benchmarked on CUDA only (the CPU interpreter measures nothing)"
    if case["op"] != "attention":
        return None
    why = unavailable_reason(case)
    if why or not (case["backend"] in SDPA or case["backend"] == "varlen"):
        return why
    key = (case["backend"], case["batch"] == "equal", case["mode"], case["dtype"], case["device"], case["S"])
    if key not in probes:
        tiny = dict(case, N=16, min_utterances=64)
        try:
            build_case(tiny)
            probes[key] = None
        except Unavailable as err:
            probes[key] = str(err)
        except Exception:                                    # noqa: BLE001 - let the real case report it
            probes[key] = None
    return probes[key]
