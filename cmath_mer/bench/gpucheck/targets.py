"""The whole step's GPU targets (docs/KERNELS.md, "Speed targets"), measured in one stage:

* speed: train.py's whole step (Stepper: autocast, backward, clip, AdamW, device-side meters) on one
  4,096-utterance conversation; the best of train.py's step modes with the Triton ops in bf16 (eager,
  `--compile`, `--cuda-graphs`: each is how a user trains) must be >= 3x the eager fp32 reference and >= 1.5x
  `torch.compile` of the reference (bf16); every row's ratios are in the JSON, so each mode reads apart;
* GPU busy: train.py's loop (Prefetcher feeding Stepper, a new batch each step) on 16
  conversations of ~100 utterances, profiled: no idle gap between two steps' device work over GAP_THRESHOLD_US.

A missed target is a finding, not a broken check: `ok` says everything was measured, `targets` holds the
verdicts. On a CPU the same code runs on tiny shapes and every verdict is CPU_VERDICT.
"""
from __future__ import annotations

import bisect
import gc
import gzip
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cmath_mer import bench as B
from cmath_mer.bench.gpucheck.common import guarded, seconds_left, training_stepper, write_json
from cmath_mer.data.synthetic import make_synthetic
from cmath_mer.model.cmath import CMATH
from cmath_mer.training.feed import Prefetcher
from cmath_mer.training.prepare import build_config

CPU_VERDICT = "cpu: not a target"
NOT_MEASURED = "not measured"
# A launch on an H100 costs a few µs; 100 µs between two steps is tens of launches' worth of an idle device,
# and under 1% of the fastest step measured there (16.5 ms, --cuda-graphs at 4,096 utterances).
GAP_THRESHOLD_US = 100.0
STEP_PREFIX = "gpucheck step "
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")      # Kineto's device activity in a chrome trace
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")             # host launches: their correlation id names the kernel
HOST_CATS = ("cpu_op", "user_annotation", "python_function") + LAUNCH_CATS    # timed by the host's clock

REFERENCE = ("torch", "fp32")                      # the eager fp32 reference
COMPILED_REFERENCE = ("torch_compile", "bf16")     # torch.compile of the reference, same precision as ours
OURS = ("triton", "triton_compile", "triton_graphs")     # train.py's step modes with the Triton ops, bf16
GRAPHS_TARGET = 8.0       # the default train step (CUDA graphs) against the same run with --no-cuda-graphs
SPEEDUP_TARGETS = {"speedup_vs_eager_fp32": (REFERENCE, 3.0),
                   "speedup_vs_torch_compile_bf16": (COMPILED_REFERENCE, 1.5)}
TARGET_LABELS = {"speedup_vs_eager_fp32": "the eager fp32 reference (torch fp32)",
                 "speedup_vs_torch_compile_bf16": "the compiled reference (torch_compile bf16)"}
# a compiled row starts only with this much of the stage's limit left (its compile on a GPU machine is not
# measured yet; the CPU took 45 s for the tiny step); a row skipped for it is "not measured", never a pass
COMPILE_RESERVE_S = 60
# measured on a 2-core CPU: 45 s to compile the tiny step, 63 s for the row
CPU_COMPILE_SKIP = ("torch.compile of the step took 45 s to compile on a 2-core CPU (63 s for the row), too long "
                    "for the CPU run of this stage; `cmath-mer bench` times the compiled step on a CPU")


def step_rows(device: str) -> list[tuple[str, str]]:
    """(backend, dtype) of each timed row, eager first: the compiled rows are the slow ones to set up."""
    if device != "cuda":
        return [("torch", "fp32"), ("torch", "bf16"), ("torch_compile", "bf16")]
    return [("torch", "fp32"), ("torch", "bf16"), ("triton", "bf16"), ("triton_graphs", "bf16"),
            ("torch_compile", "bf16"), ("triton_compile", "bf16")]


def busy_lengths(device: str) -> list[int]:
    lengths = [80 + (i * 37) % 60 for i in range(16)]       # the profile stage's 16 x ~100 workload
    return lengths if device == "cuda" else [min(n, 12) for n in lengths[:3]]


# ------------------------------------------------------------------------------------------- the stage

def stage_targets(args) -> dict:
    cuda = args.device == "cuda"
    out = Path(args.out) / "targets"
    out.mkdir(parents=True, exist_ok=True)
    # the driver's deadline, set before this process started: the imports and the interpreter's start count
    deadline = time.perf_counter() + (seconds_left(args, margin=0.0) or 300.0)
    res: dict = dict(device=args.device, utterances=4096 if cuda else 12, busy_lengths=busy_lengths(args.device),
                     gap_threshold_us=GAP_THRESHOLD_US, rows=[], gpu_busy={})

    def save():                          # partial results survive a stage killed at its limit
        write_json(out / "results.json", res)

    plan = step_rows(args.device)
    eager = [p for p in plan if not p[0].endswith("_compile")]
    for backend, dtype in eager:
        res["rows"].append(time_step_row(backend, dtype, args.device, res["utterances"]))
        save()
    for variant in (("eager", "cuda_graphs") if cuda else ("eager",)):
        res["gpu_busy"][variant] = guarded(lambda: gpu_busy(args.device, variant, out))
        save()
    for backend, dtype in (p for p in plan if p not in eager):
        if not cuda:
            row = dict(backend=backend, dtype=dtype, status="skipped", reason=CPU_COMPILE_SKIP)
        elif deadline - time.perf_counter() < COMPILE_RESERVE_S:
            row = dict(backend=backend, dtype=dtype, status="skipped",
                       reason=f"under {COMPILE_RESERVE_S} s of the stage's limit left for its compile")
        else:
            row = time_step_row(backend, dtype, args.device, res["utterances"])
        res["rows"].append(row)
        save()
    add_speedups(res["rows"])
    res["targets"] = speedup_verdicts(res["rows"], cuda)
    res["targets"].update(busy_verdicts(res["gpu_busy"], cuda))
    res["targets"].update(graphs_verdict(res["gpu_busy"], cuda))
    save()
    skipped_on_purpose = [r for r in res["rows"] if not cuda and r.get("reason") == CPU_COMPILE_SKIP]
    measured = [r for r in res["rows"] if r.get("status") == "ok"]
    res["ok"] = (len(measured) + len(skipped_on_purpose) == len(res["rows"])
                 and all("error" not in b for b in res["gpu_busy"].values()))
    return res


# ------------------------------------------------------------------------------------------ step speed

def time_step_row(backend: str, dtype: str, device: str, N: int) -> dict:
    """The benchmark's engine_step case (benchmark/build.py), built and measured here rather than through
    run_case, so that this stage holds its own time limit and reports the build (where a compiled row
    compiles, on the case's own batch) and the first call apart."""
    case = B.make_case("engine_step", backend, N, mode="train", batch="one", D=32, dtype=dtype, device=device)
    row = dict(backend=backend, dtype=dtype, utterances=N)
    if backend.endswith("_compile"):
        torch._dynamo.reset()             # the compile below is this row's own, not a cache of the previous one
    try:
        t0 = time.perf_counter()
        call, _ = B.build_case(case)
        row["build_s"] = time.perf_counter() - t0
        row.update(B.measure(call, device, reps=5, budget_s=3.0, long_call_s=3.0), status="ok")
        if backend.endswith("_compile"):
            # the build's step compiles (on the case's own batch: no second compile at the first call); the
            # time before the compiled step runs at speed (two steps' own time included, small beside it)
            row["compile_s"] = row["build_s"] + row["first_call_s"]
    except B.Unavailable as err:
        row.update(status="unavailable", reason=str(err))
    except Exception as err:                                           # noqa: BLE001 - the row's finding
        row.update(status="error", reason=f"{type(err).__name__}: {str(err).strip()[:400]}")
    finally:
        call = None
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def add_speedups(rows: list[dict]) -> None:
    """Each measured row's speedup over both references (where they were measured)."""
    for key, (ref, _) in SPEEDUP_TARGETS.items():
        r = _row(rows, ref)
        for row in rows:
            if r is not None and row.get("status") == "ok":
                row[key] = r["median_s"] / row["median_s"]


def _row(rows: list[dict], key: tuple[str, str]) -> dict | None:
    return next((r for r in rows if (r["backend"], r["dtype"]) == key and r.get("status") == "ok"), None)


def speedup_verdicts(rows: list[dict], cuda: bool) -> dict:
    """Per target: the best of OURS (bf16) over the reference. pass when a measured row reaches the target;
    fail only when every one of OURS and the reference were measured and none reaches it; else not measured."""
    done = [r for r in rows if r["backend"] in OURS and r["dtype"] == "bf16" and r.get("status") == "ok"]
    missing = [b for b in OURS if b not in {r["backend"] for r in done}]     # errored, skipped or not reached
    verdicts = {}
    for key, (ref_key, need) in SPEEDUP_TARGETS.items():
        ref = _row(rows, ref_key)
        v = dict(target=need, reference=f"{ref_key[0]} {ref_key[1]}", ours={r["backend"]: r.get(key) for r in done})
        if ref is None or not done:
            v.update(measured=None, best=None, verdict=CPU_VERDICT if not cuda else NOT_MEASURED,
                     not_measured=([f"{ref_key[0]} {ref_key[1]}"] if ref is None else []) + missing)
        else:
            best = max(done, key=lambda r: r[key])
            reached = best[key] >= need
            verdict = ("pass" if reached else NOT_MEASURED if missing else "fail") if cuda else CPU_VERDICT
            v.update(measured=best[key], best=best["backend"], verdict=verdict, not_measured=missing)
        verdicts[key] = v
    return verdicts


# ------------------------------------------------------------------------------------------- GPU busy

def gpu_busy(device: str, variant: str, out: Path, warmup: int | None = None, profiled: int | None = None) -> dict:
    """train.py's loop on the 16 x ~100 workload: Prefetcher (a background thread gathers and pins the
    next batches, copied non_blocking) feeding Stepper (`eager`, train.py's default) or GraphedStepper
    (`cuda_graphs`, --cuda-graphs), bf16 and Triton ops on CUDA. Warm-up steps, then steps timed without the
    profiler, then `profiled` steps under torch.profiler, each in a record_function range that includes
    fetching its batch. Every step is a new batch: the same lengths, other conversations, another order."""
    cuda = device == "cuda"
    warmup, profiled = warmup or (5 if cuda else 2), profiled or (10 if cuda else 3)
    timed = profiled
    steps = warmup + timed + profiled
    lengths = busy_lengths(device)
    k = len(lengths)
    order = [[lengths[(i + s) % k] for i in range(k)] for s in range(steps)]        # rotated: other orders
    data = make_synthetic("iemocap", lengths=[n for step in order for n in step], seed=0)
    cfg = build_config(data, "iemocap", backend="triton" if cuda else "torch")
    torch.manual_seed(0)
    dev = torch.device(device)
    model = CMATH(cfg).to(dev).train()
    stepper = training_stepper(model, dev, "bf16" if cuda else "fp32", graphed=variant == "cuda_graphs")
    plan = [[list(range(s * k, (s + 1) * k))] for s in range(steps)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with Prefetcher(data, plan, cfg.modalities, dev) as feed:
        batches = iter(feed)

        def run(s):
            with record_function(f"{STEP_PREFIX}{s}"):
                micro = next(batches)
                stepper.set_lr(1e-3)
                stepper(micro, 0, s)
        for s in range(warmup):
            run(s)
        sync()
        t0 = time.perf_counter()
        for s in range(warmup, warmup + timed):
            run(s)
        sync()
        wall = (time.perf_counter() - t0) / timed
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for s in range(warmup + timed, steps):
                run(s)
            sync()
    events = _trace_events(prof, out / f"trace_{variant}.json")
    intervals, names, step_ranges, unassigned, dropped = activity_intervals(events, cuda)
    _save_compact(out / f"busy_{variant}.json.gz", intervals, step_ranges)
    res = dict(variant=variant, lengths=lengths, utterances_per_step=sum(lengths), profiled_steps=profiled,
               wall_ms_per_step_unprofiled=wall * 1e3,
               activity="CUDA kernels, memcpy and memset (all streams)" if cuda else
                        "CPU ops of the training thread (no device on a CPU run)",
               unassigned_intervals=unassigned, dropped_out_of_session=dropped)
    res.update(idle_gaps(intervals, step_ranges))
    name_gaps(res["largest_gaps"], intervals, names)
    res["device_busy_ms_per_step"] = res["busy_us"] / 1e3 / profiled
    if variant == "cuda_graphs":
        res["graphs_captured"], res["graphs_replayed"] = stepper.captured, stepper.replayed
    return res


def _trace_events(prof, path: Path) -> list[dict]:
    """The profiler's chrome trace, read back (Kineto's own record of device activity and correlation ids);
    the file itself is deleted (tens of MB), the analysed intervals are kept in busy_<variant>.json.gz."""
    prof.export_chrome_trace(str(path))
    try:
        return json.loads(path.read_text())["traceEvents"]
    finally:
        path.unlink(missing_ok=True)


def activity_intervals(events: list[dict], cuda: bool):
    """(intervals, names, step_ranges, unassigned, dropped) from chrome-trace events. intervals: (start_us,
    end_us) of device activity (CUDA) or of the training thread's CPU ops (CPU); names: the event of each. An
    interval belongs to the step whose host range (the record_function STEP_PREFIX range) holds its anchor: for
    a kernel, memcpy or memset, the host launch with the same correlation id (the device runs it later); for a
    CPU op, its own start. step_ranges: per step, in order, the first start and last end of its intervals
    (steps with none are left out). unassigned: intervals whose anchor lies in no step range (they still count
    in the union). dropped: activity left out for lying outside the session (session_window)."""
    marks = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(STEP_PREFIX))
    if cuda:
        launched = {e["args"]["correlation"]: e["ts"] for e in events
                    if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
        acts = [(e, launched.get(e.get("args", {}).get("correlation"))) for e in events if e.get("cat") in DEVICE_CATS]
    else:
        tids = {e.get("tid") for e in events if e.get("cat") == "user_annotation"
                and str(e.get("name", "")).startswith(STEP_PREFIX)}
        acts = [(e, e["ts"]) for e in events if e.get("cat") == "cpu_op" and e.get("tid") in tids]
    starts = [m[0] for m in marks]
    lo, hi = session_window(events, marks)
    per_step: dict[int, list] = {}
    intervals, names, unassigned, dropped = [], [], 0, 0
    for e, anchor in acts:
        iv = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        if not lo <= iv[0] <= iv[1] <= hi:
            dropped += 1
            continue
        intervals.append(iv)
        names.append(str(e.get("name", ""))[:120])
        k = bisect.bisect_right(starts, anchor) - 1 if anchor is not None else -1
        if k >= 0 and anchor <= marks[k][1]:
            per_step.setdefault(k, []).append(iv)
        else:
            unassigned += 1
    step_ranges = [(min(s for s, _ in ivs), max(e for _, e in ivs)) for _, ivs in sorted(per_step.items())]
    return intervals, names, step_ranges, unassigned, dropped


def session_window(events: list[dict], marks) -> tuple[float, float]:
    """(first step's start, end of the last host event): where the session's activity can lie. The device runs
    nothing of the steps before the first one starts (the loop synchronises before the profiler starts) and
    finishes before the synchronisation after the last step returns, a host event. A later profiler session in
    one process can carry device records whose timestamps are ~1e11 us off (a known Kineto issue): kept, one
    would stretch a step's range over the gaps after it and pass the gap target spuriously."""
    host_ends = [e["ts"] + e.get("dur", 0) for e in events if e.get("cat") in HOST_CATS and e.get("ph", "X") == "X"]
    if not marks or not host_ends:
        return float("-inf"), float("inf")
    return float(marks[0][0]), float(max(host_ends))


def _save_compact(path: Path, intervals, step_ranges) -> None:
    """The busy pieces (the union of the intervals) and the step ranges, in trace microseconds."""
    with gzip.open(path, "wt") as f:
        json.dump(dict(busy_us=merge_intervals(intervals), step_ranges_us=step_ranges), f)


def name_gaps(gaps: list[dict], intervals, names) -> None:
    """Adds to each gap (from idle_gaps) the activity that ends where it starts and the one that starts where
    it ends: what the device did last before waiting and what it waited for."""
    ends = {e: n for (_, e), n in sorted(zip(intervals, names))}
    starts = {s: n for (s, _), n in sorted(zip(intervals, names), reverse=True)}
    for g in gaps:
        g["last_before"], g["first_after"] = ends.get(g["start_us"]), starts.get(g["start_us"] + g["us"])


# -------------------------------------------------------------------------------------- gap analysis

def merge_intervals(intervals) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, sorted; overlapping, nested and abutting ones merge."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def gap_location(gap, step_ranges) -> str:
    """'inside step k' when one step's range holds the whole gap, else 'between steps j and k' (or before the
    first / after the last step); steps are numbered by their order in step_ranges."""
    a, b = gap
    for k, (s, e) in enumerate(step_ranges):
        if s <= a and b <= e:
            return f"inside step {k}"
    before = [k for k, (_, e) in enumerate(step_ranges) if e <= a]
    after = [k for k, (s, _) in enumerate(step_ranges) if s >= b]
    if before and after:
        return f"between steps {before[-1]} and {after[0]}"
    if after:
        return f"before step {after[0]}"
    return f"after step {before[-1]}" if before else "no step"


def idle_gaps(intervals, step_ranges=(), threshold_us: float = GAP_THRESHOLD_US, top: int = 5) -> dict:
    """Busy fraction = the union of the intervals / (last end - first start); the idle gaps between the
    union's pieces, the `top` largest and where they fall, and the gaps over threshold_us, between steps too."""
    merged = merge_intervals(intervals)
    if not merged:
        return dict(intervals=0, busy_us=0.0, span_us=0.0, busy_fraction=None, gaps=0, largest_gap=None,
                    largest_gaps=[],
                    gaps_over_threshold=0, largest_between_steps_gap_us=None, between_steps_gaps_over_threshold=0,
                    threshold_us=threshold_us, steps_found=len(step_ranges))
    first, last = merged[0][0], merged[-1][1]
    busy = sum(e - s for s, e in merged)
    gaps = [((a[1], b[0]), gap_location((a[1], b[0]), step_ranges)) for a, b in zip(merged, merged[1:])]
    between = [b - a for (a, b), where in gaps if where.startswith("between")]
    biggest = sorted(gaps, key=lambda g: g[0][0] - g[0][1])[:top]
    largest = [dict(us=b - a, at_us=a - first, start_us=a, where=where) for (a, b), where in biggest]
    return dict(intervals=len(intervals), busy_us=busy, span_us=last - first,
                busy_fraction=busy / (last - first) if last > first else 1.0, gaps=len(gaps),
                largest_gap=largest[0] if largest else None, largest_gaps=largest,
                gaps_over_threshold=sum(b - a > threshold_us for (a, b), _ in gaps),
                largest_between_steps_gap_us=max(between, default=0.0) if step_ranges else None,
                between_steps_gaps_over_threshold=sum(g > threshold_us for g in between),
                threshold_us=threshold_us, steps_found=len(step_ranges))


def busy_verdicts(busy: dict, cuda: bool) -> dict:
    """Per train.py mode: pass when no gap between two steps exceeds the threshold (measured on the steps the
    trace shows: at least two step ranges, or it is not measured)."""
    out = {}
    for variant, r in busy.items():
        measured = "error" not in r and (r.get("steps_found") or 0) >= 2
        v = dict(target=f"no idle gap between steps > {GAP_THRESHOLD_US:g} us",
                 measured=r.get("largest_between_steps_gap_us") if measured else None,
                 busy_fraction=r.get("busy_fraction"), largest_gap=r.get("largest_gap"),
                 dropped_out_of_session=r.get("dropped_out_of_session"))
        if not cuda:
            v["verdict"] = CPU_VERDICT
        elif not measured:
            v["verdict"] = NOT_MEASURED
        else:
            v["verdict"] = "pass" if r["between_steps_gaps_over_threshold"] == 0 else "fail"
        out[f"gpu_busy_{variant}"] = v
    return out


def graphs_verdict(busy: dict, cuda: bool) -> dict:
    """The default `train` step (CUDA graphs) against the same loop with --no-cuda-graphs (eager), on the
    16 x ~100 workload: the ratio of their unprofiled wall times per step, pass at >= GRAPHS_TARGET."""
    eager, graphs = busy.get("eager") or {}, busy.get("cuda_graphs") or {}
    a, b = eager.get("wall_ms_per_step_unprofiled"), graphs.get("wall_ms_per_step_unprofiled")
    measured = a / b if a and b and "error" not in eager and "error" not in graphs else None
    verdict = CPU_VERDICT if not cuda else NOT_MEASURED if measured is None else \
        "pass" if measured >= GRAPHS_TARGET else "fail"
    return {"default_step_vs_no_cuda_graphs": dict(target=f">= {GRAPHS_TARGET:g}x", measured=measured,
                                                   eager_ms=a, graphs_ms=b, verdict=verdict)}


# ------------------------------------------------------------------------------------------ summary.md

def with_verdicts(res: dict, device: str | None) -> dict:
    """The stage's result with its verdicts; a stage stopped at its time limit has none, so they are worked
    out from the rows it saved as it went (the driver puts them under `partial`): a row it did not reach
    counts as not measured."""
    if res.get("targets") or not (res.get("partial") or {}).get("rows"):
        return res
    part, cuda = res["partial"], device == "cuda"
    rows = [dict(r) for r in part["rows"]]
    add_speedups(rows)
    verdicts = speedup_verdicts(rows, cuda)
    verdicts.update(busy_verdicts(part.get("gpu_busy") or {}, cuda))
    verdicts.update(graphs_verdict(part.get("gpu_busy") or {}, cuda))
    return dict(part, rows=rows, targets=verdicts)


def summary_lines(res: dict) -> list[str]:
    """The 'Speed targets' table of summary.md."""
    t = res.get("targets") or {}
    if not t:
        return []
    busy = res.get("busy_lengths") or [0]
    lines = ["", f"## Speed targets ({res.get('device')}: the step on one {res.get('utterances')}-utterance "
                 f"conversation; GPU busy on {len(busy)} conversations of {min(busy)}-{max(busy)} utterances)", "",
             "| target | measured | verdict |", "| --- | --- | --- |"]
    for key, (_, need) in SPEEDUP_TARGETS.items():
        v = t.get(key)
        if v is None:
            continue
        each = ", ".join(f"{b} {x:.2f}x" if x is not None else f"{b} -" for b, x in v["ours"].items())
        got = f"{v['measured']:.2f}x ({v['best']}; {each})" if v["measured"] is not None else \
            f"- (not measured: {', '.join(v['not_measured']) or '-'})"
        lines.append(f"| whole step, ours in bf16 >= {need:g}x {TARGET_LABELS[key]} | {got} | {v['verdict']} |")
    v = t.get("default_step_vs_no_cuda_graphs")
    if v is not None:
        got = (f"{v['measured']:.1f}x ({v['eager_ms']:.1f} -> {v['graphs_ms']:.1f} ms per step)"
               if v["measured"] is not None else "-")
        lines.append(f"| default train step (CUDA graphs) {v['target']} the same run with --no-cuda-graphs, "
                     f"16 x ~100 | {got} | {v['verdict']} |")
    for key, v in t.items():
        if not key.startswith("gpu_busy_"):
            continue
        frac = v.get("busy_fraction")
        gap = v.get("largest_gap") or {}
        got = (f"largest between steps {v['measured']:.0f} us; busy {frac:.0%}; largest gap {gap.get('us', 0):.0f} us "
               f"({gap.get('where')})" if v["measured"] is not None and frac is not None else "-")
        if v.get("dropped_out_of_session"):
            got += f"; {v['dropped_out_of_session']} records outside the profiled steps dropped"
        lines.append(f"| GPU busy, {key[9:]}: {v['target']} | {got} | {v['verdict']} |")
    return lines
