"""The GPU check (python -m cmath_mer.gpucheck): its plan is complete, and its parity and determinism checks
catch what they claim to catch, and the targets stage's gap analysis and verdicts are right. The stages
themselves run on a CUDA machine; here their comparisons run on CPU tensors under the interpreter, and the
targets stage runs whole on tiny CPU shapes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cmath_mer.bench import gpucheck

from helpers import needs_triton


def test_dry_run_lists_every_stage_and_each_has_an_implementation():
    p = subprocess.run([sys.executable, "-m", "cmath_mer.bench.gpucheck", "--dry-run"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines() if line and line.split()[0] in gpucheck.STAGE_NAMES]
    assert listed == gpucheck.STAGE_NAMES
    for name in gpucheck.STAGE_NAMES:
        assert callable(getattr(gpucheck, f"stage_{name}")), name


def test_unknown_stage_is_refused():
    p = subprocess.run([sys.executable, "-m", "cmath_mer.bench.gpucheck", "--dry-run", "--stages", "parity,nope"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "nope" in p.stderr


def test_cuda_parity_plan_covers_every_op_in_every_precision_mode():
    cases = gpucheck.parity_cases("cuda")
    covered = {(c["op"], c["mode"]) for c in cases}
    for op in ("attention", "reconstruction", "variational"):
        for mode in gpucheck.MODES:
            assert (op, mode) in covered, (op, mode)
    assert any(c["op"] == "attention" and c["window"] is not None for c in cases)
    # interior key blocks with a window need 2 W >= BM + BN - 2 (fused._split): 190 for the (128, 64) forward
    assert any(c["op"] == "attention" and (c["window"] or 0) >= 95 and max(c["lengths"]) > 256 for c in cases)
    for mode in gpucheck.MODES:      # the one-pass backward (max_seqlen within one tile) in every mode
        assert any(c["op"] == "attention" and c.get("max_seqlen") and c["mode"] == mode and max(c["lengths"]) <= 32
                   for c in cases), mode
    assert any(c["op"] == "reconstruction_exact" for c in cases)       # the TF32-bias case
    assert any(c["op"] == "variational" and c.get("eps_offset", 0) % 4 for c in cases)   # misaligned eps build


@pytest.fixture
def interpreted():
    pytest.importorskip("triton")


@pytest.mark.parametrize("op", ["attention", "reconstruction", "variational"])
def test_parity_case_passes_for_the_kernel_and_fails_for_a_perturbed_one(op, interpreted, monkeypatch):
    case = next(c for c in gpucheck.parity_cases("cpu") if c["op"] == op and c["mode"] == "fp32")
    seed = int(torch.randint(0, 10_000, ()).item())
    good = gpucheck.run_parity_case(case, "cpu", seed=seed)
    assert good["ok"], good["errors"]

    import cmath_mer.kernels as kernels
    from cmath_mer.kernels.reconstruction import fused as reconstruction_kernels
    # the reconstruction's "fused" side is the Triton kernels themselves (auto runs the cuBLAS chunks on CUDA)
    module, name = {"attention": (kernels, "multi_source_attention"),
                    "reconstruction": (reconstruction_kernels, "fused_reconstruction_loss"),
                    "variational": (kernels, "variational_fusion")}[op]
    real = getattr(module, name)

    def perturbed(*args, **kwargs):                  # the "fused" side only: 1e-3 relative noise on output 0
        out = real(*args, **kwargs)
        if kwargs.get("backend") != "triton" and module is kernels:
            return out
        first = out[0] if isinstance(out, tuple) else out
        noisy = first * (1 + 1e-3 * torch.randn_like(first))
        return (noisy, *out[1:]) if isinstance(out, tuple) else noisy
    monkeypatch.setattr(module, name, perturbed)
    bad = gpucheck.run_parity_case(case, "cpu", seed=seed)
    assert not bad["ok"] and bad["worst"] > bad["tol"]


def test_digest_is_bitwise():
    x = torch.randn(1000, dtype=torch.bfloat16)
    assert gpucheck.digest([x]) == gpucheck.digest([x.clone()])
    y = x.clone()
    y.view(torch.int16)[int(torch.randint(0, 1000, ()).item())] ^= 1      # one bit of one element
    assert gpucheck.digest([x]) != gpucheck.digest([y])


def test_sized_cases_stay_small_on_the_cpu_and_untouched_on_cuda():
    case = dict(op="attention", mode="bf16", lengths=[300, 1000], S=2, H=8, D=32, window=None)
    assert gpucheck.sized(case, "cuda") == case
    small = gpucheck.sized(case, "cpu")
    assert max(small["lengths"]) <= 40 and small["mode"] == "fp32"


# ------------------------------------------------------------------------------------ the targets stage

def test_targets_stage_follows_profile_and_owns_the_4096_engine_steps():
    names = gpucheck.STAGE_NAMES
    assert names.index("targets") == names.index("profile") + 1
    rows = gpucheck.targets.step_rows("cuda")
    for needed in [("torch", "fp32"), ("torch_compile", "bf16"), ("triton", "bf16"), ("triton_compile", "bf16")]:
        assert needed in rows, needed
    assert not [c for c in gpucheck.bench_cases("cuda") if c["op"] == "engine_step" and c["N"] == 4096]


def test_merge_intervals_joins_overlapping_nested_and_abutting():
    got = gpucheck.merge_intervals([(20, 25), (0, 10), (5, 8), (10, 12), (22, 30), (40, 41), (2, 3)])
    assert got == [(0, 12), (20, 30), (40, 41)]


def _covering(rng, start: float, length: float) -> list[tuple[float, float]]:
    """Random intervals (overlapping, nested, abutting) whose union is exactly [start, start + length]."""
    out, reach = [], start
    while reach < start + length:
        s = rng.uniform(max(start, reach - 20.0), reach)          # starts at or before the reach: no hole
        e = min(s + rng.uniform(0.5, 30.0), start + length)
        out.append((s, e))
        if rng.random() < 0.3:                                      # a nested one
            out.append((s + (e - s) * 0.25, s + (e - s) * 0.5))
        reach = max(reach, e)
    return out


@pytest.mark.parametrize("inside", [False, True])
def test_idle_gaps_finds_a_planted_gap_and_where_it_falls(inside):
    import random
    seed = int(torch.randint(0, 10_000, ()).item())
    rng = random.Random(seed)
    a, gap, b = rng.uniform(500, 2000), rng.uniform(150, 900), rng.uniform(500, 2000)
    first, second = _covering(rng, 0.0, a), _covering(rng, a + gap, b)
    intervals = first + second
    rng.shuffle(intervals)
    # steps: one per busy region (the gap lies between them), or one step over both (the gap is inside it)
    steps = [(0.0, a + gap + b)] if inside else [(0.0, a), (a + gap, a + gap + b)]
    got = gpucheck.idle_gaps(intervals, steps, threshold_us=100.0)
    assert got["gaps"] == 1, seed
    assert got["largest_gap"]["us"] == pytest.approx(gap), seed
    assert got["largest_gap"]["at_us"] == pytest.approx(a), seed
    assert got["busy_fraction"] == pytest.approx((a + b) / (a + gap + b)), seed
    assert got["gaps_over_threshold"] == 1
    if inside:
        assert got["largest_gap"]["where"] == "inside step 0"
        assert got["between_steps_gaps_over_threshold"] == 0 and got["largest_between_steps_gap_us"] == 0.0
    else:
        assert got["largest_gap"]["where"] == "between steps 0 and 1"
        assert got["between_steps_gaps_over_threshold"] == 1
        assert got["largest_between_steps_gap_us"] == pytest.approx(gap)


def test_idle_gaps_of_a_gapless_trace_is_fully_busy():
    import random
    seed = int(torch.randint(0, 10_000, ()).item())
    got = gpucheck.idle_gaps(_covering(random.Random(seed), 5.0, 300.0), [(5.0, 305.0)])
    assert got["gaps"] == 0 and got["busy_fraction"] == pytest.approx(1.0) and got["largest_gap"] is None, seed


def test_activity_intervals_assign_kernels_to_steps_by_their_launch():
    """A chrome trace as Kineto writes it on CUDA: a kernel belongs to the step whose host range holds the
    launch with the same correlation id, wherever the kernel itself runs on the device timeline."""
    ann = [dict(cat="user_annotation", name=f"gpucheck step {k}", ts=100.0 * k, dur=100.0, tid=1) for k in (0, 1)]
    launches = [dict(cat="cuda_runtime", name="cudaLaunchKernel", ts=t, dur=2.0, args=dict(correlation=c))
                for t, c in ((10.0, 1), (60.0, 2), (120.0, 3))]
    launches.append(dict(cat="cuda_driver", name="cuLaunchKernel", ts=190.0, dur=2.0, args=dict(correlation=4)))
    launches.append(dict(cat="cuda_runtime", name="cudaDeviceSynchronize", ts=200.0, dur=210.0))   # after the loop
    kernels = [dict(cat="kernel", name="k1", ts=30.0, dur=20.0, args=dict(correlation=1)),
               dict(cat="gpu_memcpy", name="Memcpy HtoD", ts=70.0, dur=40.0, args=dict(correlation=2)),
               dict(cat="kernel", name="k3", ts=150.0, dur=20.0, args=dict(correlation=3)),
               dict(cat="gpu_memset", name="Memset", ts=200.0, dur=5.0, args=dict(correlation=4)),
               dict(cat="kernel", name="stray", ts=400.0, dur=1.0, args=dict(correlation=99))]
    intervals, names, steps, unassigned, dropped = gpucheck.targets.activity_intervals(ann + launches + kernels,
                                                                                       cuda=True)
    assert len(intervals) == 5 and names[0] == "k1"
    assert steps == [(30.0, 110.0), (150.0, 205.0)] and unassigned == 1 and dropped == 0
    got = gpucheck.idle_gaps(intervals, steps)
    assert got["largest_gap"]["where"] == "after step 1" and got["largest_gap"]["us"] == pytest.approx(195.0)
    assert got["largest_between_steps_gap_us"] == pytest.approx(40.0)


def test_device_records_outside_the_session_are_dropped_and_counted():
    """A later profiler session in one process may carry device records ~1e11 us off (Kineto). Kept, one of
    step 0 placed after step 1 would stretch step 0's range over the gap between the steps, and the gap
    target would pass spuriously; they are dropped (outside the first step's start to the last host event's
    end) and counted, and the count shows in the summary."""
    import random
    seed = int(torch.randint(0, 10_000, ()).item())
    rng = random.Random(seed)
    gap = rng.uniform(150.0, 900.0)                          # between the steps' device work, over 100 us
    b = 70.0 + gap                          # step 1's host range; its first kernel runs at b + 30 = 100 + gap
    ann = [dict(cat="user_annotation", name="gpucheck step 0", ts=0.0, dur=100.0),
           dict(cat="user_annotation", name="gpucheck step 1", ts=b, dur=100.0)]
    launches = [dict(cat="cuda_runtime", name="cudaLaunchKernel", ts=t, dur=2.0, args=dict(correlation=c))
                for t, c in ((10.0, 1), (20.0, 2), (b + 10.0, 3), (b + 20.0, 4))]
    launches.append(dict(cat="cuda_runtime", name="cudaDeviceSynchronize", ts=b + 100.0, dur=50.0))
    off = rng.uniform(0.5e11, 2e11)
    kernels = [dict(cat="kernel", name="k1", ts=30.0, dur=70.0, args=dict(correlation=1)),
               dict(cat="kernel", name="k2", ts=100.0 + off, dur=5.0, args=dict(correlation=2)),     # corrupted
               dict(cat="kernel", name="k3", ts=b + 30.0, dur=20.0, args=dict(correlation=3)),
               dict(cat="kernel", name="k4", ts=b + 50.0 - off, dur=5.0, args=dict(correlation=4))]  # corrupted
    intervals, names, steps, unassigned, dropped = gpucheck.targets.activity_intervals(ann + launches + kernels,
                                                                                       cuda=True)
    assert dropped == 2 and names == ["k1", "k3"] and unassigned == 0, seed
    res = dict(gpucheck.idle_gaps(intervals, steps), dropped_out_of_session=dropped)
    assert res["largest_between_steps_gap_us"] == pytest.approx(gap), seed
    v = gpucheck.targets.busy_verdicts(dict(eager=res), cuda=True)
    assert v["gpu_busy_eager"]["verdict"] == "fail", seed
    lines = "\n".join(gpucheck.targets.summary_lines(dict(device="cuda", targets=v)))
    assert "2 records outside the profiled steps dropped" in lines


def _row(backend, dtype, median_s=None, status="ok"):
    return dict(backend=backend, dtype=dtype, status=status, median_s=median_s,
                **({} if status == "ok" else {"reason": "RuntimeError: boom"}))


def test_speedup_verdicts_pass_fail_and_not_measured():
    ref = float(torch.empty(()).uniform_(0.05, 0.5))
    rows = [_row("torch", "fp32", ref), _row("torch_compile", "bf16", ref / 2),
            _row("triton", "bf16", ref / 1.2), _row("triton_compile", "bf16", ref / 2.5),
            _row("triton_graphs", "bf16", ref / 4)]
    gpucheck.targets.add_speedups(rows)
    v = gpucheck.speedup_verdicts(rows, cuda=True)
    fp32, comp = v["speedup_vs_eager_fp32"], v["speedup_vs_torch_compile_bf16"]
    assert fp32["verdict"] == "pass" and fp32["best"] == "triton_graphs" and fp32["measured"] == pytest.approx(4.0)
    assert comp["verdict"] == "pass" and comp["measured"] == pytest.approx(2.0)
    assert fp32["ours"]["triton"] == pytest.approx(1.2)

    slow = [dict(r, median_s=ref / 1.1) if r["backend"].startswith("triton") else r for r in rows]
    gpucheck.targets.add_speedups(slow)
    assert gpucheck.speedup_verdicts(slow, cuda=True)["speedup_vs_eager_fp32"]["verdict"] == "fail"

    # an errored row of ours that might have reached the target: not measured, never pass or fail
    broken = [_row(r["backend"], r["dtype"], status="error") if r["backend"] == "triton_graphs" else r for r in slow]
    gpucheck.targets.add_speedups(broken)
    got = gpucheck.speedup_verdicts(broken, cuda=True)["speedup_vs_eager_fp32"]
    assert got["verdict"] == "not measured" and got["not_measured"] == ["triton_graphs"]
    # an errored reference: not measured
    no_ref = [_row("torch_compile", "bf16", status="error") if r["backend"] == "torch_compile" else r for r in rows]
    gpucheck.targets.add_speedups(no_ref)
    got = gpucheck.speedup_verdicts(no_ref, cuda=True)["speedup_vs_torch_compile_bf16"]
    assert got["verdict"] == "not measured" and got["measured"] is None
    assert all(x["verdict"] == "cpu: not a target" for x in gpucheck.speedup_verdicts(rows, cuda=False).values())


def test_targets_stage_runs_on_the_cpu(tmp_path):
    import json
    import os
    env = dict(os.environ, CMATH_BENCH_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "cmath_mer.bench.gpucheck", "--device", "cpu", "--stages", "targets",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, (p.stdout, p.stderr[-3000:])
    res = json.loads((tmp_path / "targets.json").read_text())
    assert res["ok"], res
    assert set(res["targets"]) == {"speedup_vs_eager_fp32", "speedup_vs_torch_compile_bf16", "gpu_busy_eager",
                                    "default_step_vs_no_cuda_graphs"}
    assert all(v["verdict"] == "cpu: not a target" for v in res["targets"].values())
    rows = {(r["backend"], r["dtype"]): r for r in res["rows"]}
    assert rows[("torch", "fp32")]["status"] == "ok" and rows[("torch", "fp32")]["median_s"] > 0
    assert rows[("torch_compile", "bf16")]["status"] == "skipped" and rows[("torch_compile", "bf16")]["reason"]
    busy = res["gpu_busy"]["eager"]
    assert busy["steps_found"] == 3 and 0 < busy["busy_fraction"] <= 1 and busy["threshold_us"] == 100.0
    assert "Speed targets" in (tmp_path / "summary.md").read_text()


def test_partial_rows_of_a_stage_stopped_at_its_limit_give_verdicts():
    """A targets stage killed at its limit leaves only the rows it reached: a target one of them reaches is a
    pass, one none of them reaches is not measured (the missing rows might), never a fail."""
    ref = float(torch.empty(()).uniform_(0.05, 0.5))
    reached = [_row("torch", "fp32", ref), _row("torch_compile", "bf16", ref / 2), _row("triton", "bf16", ref / 4)]
    got = gpucheck.targets.with_verdicts(dict(ok=False, timeout=True, partial=dict(rows=reached)), "cuda")
    assert got["targets"]["speedup_vs_eager_fp32"]["verdict"] == "pass"
    assert got["targets"]["speedup_vs_eager_fp32"]["measured"] == pytest.approx(4.0)
    slow = [_row("torch", "fp32", ref), _row("torch_compile", "bf16", ref / 2), _row("triton", "bf16", ref / 1.1)]
    got = gpucheck.targets.with_verdicts(dict(ok=False, timeout=True, partial=dict(rows=slow)), "cuda")
    v = got["targets"]["speedup_vs_eager_fp32"]
    assert v["verdict"] == "not measured" and set(v["not_measured"]) == {"triton_compile", "triton_graphs"}
    lines = "\n".join(gpucheck.targets.summary_lines(got))
    assert "Speed targets" in lines and "not measured" in lines
    done = dict(ok=True, targets=dict(x=1))
    assert gpucheck.targets.with_verdicts(done, "cuda") is done          # a finished stage keeps its own


def test_budget_cuts_stage_limits_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    """--budget: each stage runs under min(its limit, what is left); a stage with less left than the least time
    it needs is SKIPPED (a later one that needs less still runs); the summary names the stages a second call
    should run, the SKIPPED and the TIMEOUT ones."""
    import json

    from cmath_mer.bench.gpucheck import driver
    seen, clock = [], [0.0]
    monkeypatch.setattr(driver.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(driver.time, "time", lambda: 1000.0 + clock[0])
    # (name, what, limit, least time) and the seconds each takes here; profile is stopped at its limit
    monkeypatch.setattr(driver, "STAGES", [("env", "e", 30, 10), ("graph_train", "g", 150, 120),
                                           ("train_demo", "t", 100, 80), ("profile", "p", 60, 30)])
    takes = {"env": 20.0, "graph_train": 70.0, "profile": 60.0}

    def fake_run(cmd, limit_s):
        name = cmd[cmd.index("--stage") + 1]
        seen.append((name, limit_s, float(cmd[cmd.index("--stage-deadline") + 1]) - 1000.0 - clock[0]))
        clock[0] += takes[name]
        return (None, "", "") if name == "profile" else (0, "RESULT " + json.dumps(dict(ok=True)), "")
    monkeypatch.setattr(driver, "run_with_limit", fake_run)
    budget = 150 + int(torch.randint(0, 10, ()))      # graph_train gets 130-139 s of its 150; train_demo 60-69
    rc = driver.main(["--device", "cuda", "--stages", "env,graph_train,train_demo,profile", "--out", str(tmp_path),
                      "--budget", str(budget)])
    assert [s[0] for s in seen] == ["env", "graph_train", "profile"] and rc == 1
    assert seen[0][1] == 30 and seen[1][1] == budget - 20 == seen[1][2] and seen[2][1] == 60
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_demo"]["skipped"] and not summary["train_demo"]["ok"]
    assert "needs about 80 s" in summary["train_demo"]["error"]
    assert summary["rerun"] == ["train_demo", "profile"]
    md = (tmp_path / "summary.md").read_text()
    assert "| train_demo | SKIPPED |" in md and "| profile | TIMEOUT |" in md
    assert "`--stages train_demo,profile`" in md


def test_a_stage_stopped_at_its_limit_keeps_its_partial_rows_in_the_summary(tmp_path, monkeypatch):
    import json

    from cmath_mer.bench.gpucheck import driver
    ref = float(torch.empty(()).uniform_(0.05, 0.5))
    rows = [_row("torch", "fp32", ref), _row("triton_graphs", "bf16", ref / 5)]

    def fake_run(cmd, limit_s):
        (tmp_path / "targets").mkdir(exist_ok=True)
        (tmp_path / "targets" / "results.json").write_text(json.dumps(dict(rows=rows, gpu_busy={})))
        return None, "", ""                                       # stopped at its limit
    monkeypatch.setattr(driver, "run_with_limit", fake_run)
    assert driver.main(["--device", "cuda", "--stages", "targets", "--out", str(tmp_path)]) == 1
    res = json.loads((tmp_path / "targets.json").read_text())
    assert res["timeout"] and res["partial"]["rows"] == rows
    md = (tmp_path / "summary.md").read_text()
    assert "| targets | TIMEOUT |" in md and "5.00x (triton_graphs" in md and "| pass |" in md


# ------------------------------------------------------------------------------------- the stages' processes

def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped or dead child of a killed stage does not run)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("ending", ["over its limit", "crashed"])
def test_a_stage_takes_its_children_with_it(ending, tmp_path, monkeypatch):
    """What a stage starts (a demo training run, workers) must not go on using the GPU after the stage was
    stopped at its limit, or after it crashed and left them running; the stage's log is what it printed, as
    text."""
    import json
    import os
    import signal
    import time

    from cmath_mer.bench.gpucheck import driver
    word = f"partial-{int(torch.randint(0, 10_000, ()))}-é"
    stage = (f"import subprocess, sys, time\n"
             f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],\n"
             f"                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             f"print('CHILD', child.pid, {word!r}, flush=True)\n"
             + ("time.sleep(600)\n" if ending == "over its limit" else "raise SystemExit(3)\n"))
    monkeypatch.setattr(driver, "stage_command", lambda name, args, out, deadline: [sys.executable, "-c", stage])
    monkeypatch.setattr(driver, "STAGES", [("env", "a stage that leaves a child running", 3, 0)])
    assert driver.main(["--device", "cuda", "--stages", "env", "--out", str(tmp_path)]) == 1
    log = (tmp_path / "env.log").read_text()
    line = next(ln for ln in log.splitlines() if ln.startswith("CHILD"))
    pid = int(line.split()[1])
    try:
        for _ in range(50):                     # SIGKILL is delivered at once; the reaping may take a moment
            if not _running(pid):
                break
            time.sleep(0.1)
        assert not _running(pid), "the stage's child outlived the stage"
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    assert word in line and "b'" not in log
    res = json.loads((tmp_path / "env.json").read_text())
    assert not res["ok"] and bool(res.get("timeout")) == (ending == "over its limit")


def test_a_process_a_stage_starts_stops_before_the_stage_limit():
    """common.run_child: a demo run or worker gets what is left of the stage's limit less a margin, so the stage
    records it as stopped (returncode None, its output kept as text) instead of being killed with it."""
    import time
    from types import SimpleNamespace

    from cmath_mer.bench.gpucheck.common import run_child, seconds_left
    word = f"started-{int(torch.randint(0, 10_000, ()))}"
    args = SimpleNamespace(stage_deadline=time.time() + 6.0)               # 1 s once the 5 s margin is kept
    p = run_child([sys.executable, "-c", f"import time; print({word!r}, flush=True); time.sleep(600)"], args)
    assert p.returncode is None and word in p.stdout and "time limit" in p.stderr
    assert seconds_left(SimpleNamespace()) is None                          # called directly: no limit


# ------------------------------------------------------------------------------------ tools/gpu_session.sh

def test_the_demo_stage_reruns_into_a_folder_that_holds_its_earlier_run(tmp_path):
    """A second call into the same results folder: `cmath-mer train` refuses a folder that holds a run, so the
    stage's demo runs replace their own (--overwrite)."""
    from types import SimpleNamespace

    from cmath_mer.bench.gpucheck import runs
    earlier = tmp_path / "train_demo" / "torch"
    earlier.mkdir(parents=True)
    (earlier / "metrics.json").write_text("{}")                      # what a run folder holds
    res = runs.stage_train_demo(SimpleNamespace(device="cpu", out=str(tmp_path)))
    assert res["ok"], res.get("error")


def test_gpu_session_runs_the_fault_checks_before_the_speed_targets(tmp_path):
    """The default stages, in the order they run (a budget of 1 s skips them all, and the second call the script
    prints lists them in its order): every correctness stage before the speed targets, and all of them."""
    import os
    from pathlib import Path

    from cmath_mer.bench.gpucheck.driver import STAGE_NAMES
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path), RESULTS=str(tmp_path / "results"),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run([str(root / "tools" / "gpu_session.sh"), "1"], capture_output=True, text=True, env=env,
                       timeout=300)
    last = p.stdout.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("not finished; second call: tools/gpu_session.sh 1 "), p.stdout
    order = last.split()[-1].split(",")
    assert sorted(order) == sorted(STAGE_NAMES)
    faults = ("parity", "autotune_cold", "determinism", "cuda_graph", "graph_train")
    assert max(order.index(s) for s in faults) < order.index("targets"), order


def test_gpu_session_smoke_on_the_cpu(tmp_path):
    """DEVICE=cpu: the caller's PYTHONPATH is kept, TRITON_INTERPRET is set, checkpoints and their temporaries
    stay out of the tarball, and the last line printed is the second call for the stages not finished."""
    import json
    import os
    import tarfile
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    results = tmp_path / "results"
    (results / "train_demo" / "torch").mkdir(parents=True)
    for name in ("best.safetensors", ".best.safetensors.ab12cd.tmp", "x.pt", "keep.json"):
        (results / "train_demo" / "torch" / name).write_text("x")
    log, extra = tmp_path / "python.log", f"/nowhere/{int(torch.randint(0, 10_000, ()))}"
    wrapper = tmp_path / "python"              # records the environment every python of the script starts in
    wrapper.write_text(f'#!/bin/sh\necho "$PYTHONPATH|$TRITON_INTERPRET" >> {log}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, DEVICE="cpu", OUT=str(tmp_path), RESULTS=str(results), PYTHON=str(wrapper),
               PYTHONPATH=extra, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    # graph_train needs 600 s on a CPU (4x its H100 time): SKIPPED under a 100 s budget
    p = subprocess.run([str(root / "tools" / "gpu_session.sh"), "100", "env,graph_train"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]                         # graph_train not run
    assert p.stdout.strip().splitlines()[-1] == "not finished; second call: tools/gpu_session.sh 100 graph_train"
    assert set(log.read_text().splitlines()) == {f"{root}:{extra}|1"}
    assert json.loads((results / "env.json").read_text())["interpret"] == "1"
    with tarfile.open(tmp_path / "gpucheck.tgz") as tar:
        names = [Path(n).name for n in tar.getnames()]
    assert "keep.json" in names and "summary.md" in names
    assert not [n for n in names if ".safetensors" in n or n.endswith((".tmp", ".pt"))], names


# ------------------------------------------------------------------------- one error keeps the earlier rows

def test_autotune_cold_keeps_its_first_call_rows_when_the_config_sequence_fails(monkeypatch):
    from types import SimpleNamespace

    from cmath_mer.bench.gpucheck import parity
    word = f"boom-{int(torch.randint(0, 10_000, ()))}"
    monkeypatch.setattr(parity, "run_parity_case", lambda case, device, seed: dict(case, ok=True))

    def fails(device):
        raise RuntimeError(word)
    monkeypatch.setattr(parity, "_configs_in_sequence", fails)
    res = parity.stage_autotune_cold(SimpleNamespace(device="cpu"))
    assert not res["ok"] and len(res["first_calls"]) == 6 and all(r["ok"] for r in res["first_calls"])
    assert word in res["configs_in_sequence"]["error"]


def test_profile_keeps_the_first_shape_when_the_second_fails(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import cmath_mer.bench as B
    import cmath_mer.model.config as C
    from cmath_mer.bench.gpucheck import runs
    word = f"boom-{int(torch.randint(0, 10_000, ()))}"
    real, real_preset = B.model_batch, C.preset
    small = dict(backend="torch", d_model=32, n_heads=2, n_layers=1, d_hidden=32, d_latent=16)
    monkeypatch.setattr(C, "preset", lambda name, **kw: real_preset(name, **small))     # minutes -> seconds

    def second_fails(cfg, lengths, device, *a, **k):       # the second shape is one conversation
        if len(lengths) == 1:
            raise RuntimeError(word)
        return real(cfg, lengths, device, *a, **k)
    monkeypatch.setattr(B, "model_batch", second_fails)
    res = runs.stage_profile(SimpleNamespace(device="cpu", out=str(tmp_path)))
    assert not res["ok"] and word in res["one4096"]["error"]
    assert res["mix16x100"]["wall_ms_per_step"] > 0 and (tmp_path / "profile_mix16x100.txt").exists()


def _recomputing_config():
    from cmath_mer.model.config import preset
    # dropout on, and every batch of 16 utterances or more recomputed in the backward (selective checkpointing)
    return preset("iemocap", backend="torch", d_model=32, n_heads=2, n_layers=1, d_hidden=32, d_latent=16,
                  recompute_from=16, dropout=0.2, input_dropout=0.2)


def test_graph_train_equality_on_a_recomputed_batch_with_dropout_holds_for_correct_replays():
    """The harness of graph_train's recompute check (run on a GPU), with the CPU graph stand-in: every generator
    seeded alike before each step, a replay that redraws its forward's masks in the recomputation agrees with
    the eager step (bit for bit at most sizes; ~3e-5 at some, from the loss normalisation); one capture, then
    replays."""
    from cmath_mer.bench.gpucheck.graphs import MASKS_DIFFER, steppers_agree

    from helpers import StandInGraphs
    cfg = _recomputing_config()
    n = int(torch.randint(cfg.recompute_from, 40, ()))
    res = steppers_agree(cfg, [[n, 3]] * 3, "cpu", graphs=StandInGraphs())
    assert res["param_rel_err"] < MASKS_DIFFER / 10 and res["captured"] == 1 and res["replayed"] == 2, res


def test_graph_train_equality_catches_a_replay_that_draws_other_masks():
    """The same check fails when a replay's dropout draws differ from the eager step's (here the replay draws
    one number first, shifting every mask after it): the check is sensitive to the masks."""
    from cmath_mer.bench.gpucheck.graphs import MASKS_DIFFER, steppers_agree

    from helpers import StandInGraphs

    class ShiftedReplays(StandInGraphs):
        def capture(self, fn):
            def replay():
                torch.rand(1)
                fn()
            return super().capture(replay)
    cfg = _recomputing_config()
    res = steppers_agree(cfg, [[int(torch.randint(cfg.recompute_from, 40, ())), 3]] * 3, "cpu",
                         graphs=ShiftedReplays())
    assert res["replayed"] == 2 and res["param_rel_err"] > 3 * MASKS_DIFFER, res


def test_default_step_against_no_cuda_graphs_verdict():
    """The default train step (CUDA graphs) must be >= 8x the same loop run eagerly; either row missing or
    failed is not measured, never a pass; on a CPU there is no verdict."""
    eager_ms = float(torch.randint(40, 90, ()))
    fast, slow = eager_ms / 10, eager_ms / 5
    verdict = gpucheck.targets.graphs_verdict
    ok = verdict(dict(eager=dict(wall_ms_per_step_unprofiled=eager_ms),
                      cuda_graphs=dict(wall_ms_per_step_unprofiled=fast)), cuda=True)
    assert ok["default_step_vs_no_cuda_graphs"]["verdict"] == "pass"
    assert ok["default_step_vs_no_cuda_graphs"]["measured"] == pytest.approx(10.0)
    bad = verdict(dict(eager=dict(wall_ms_per_step_unprofiled=eager_ms),
                       cuda_graphs=dict(wall_ms_per_step_unprofiled=slow)), cuda=True)
    assert bad["default_step_vs_no_cuda_graphs"]["verdict"] == "fail"
    missing = verdict(dict(eager=dict(wall_ms_per_step_unprofiled=eager_ms), cuda_graphs=dict(error="x")), cuda=True)
    assert missing["default_step_vs_no_cuda_graphs"]["verdict"] == "not measured"
    assert verdict({}, cuda=False)["default_step_vs_no_cuda_graphs"]["verdict"] == gpucheck.targets.CPU_VERDICT
@needs_triton
def test_graph_train_replay_with_permuted_lengths_matches_eager():
    """The harness of graph_train's permuted-lengths replay, with the CPU graph stand-in on the interpreter:
    lengths written into the static cu_seqlens in place (no version bump) are what the replay computes with."""
    from cmath_mer.bench.gpucheck.graphs import permuted_lengths_replay

    from helpers import StandInGraphs
    res = permuted_lengths_replay("cpu", graphs=StandInGraphs())
    assert res["ok"] and max(res["rel_err"].values()) < 1e-5, res


@needs_triton
def test_graph_train_replay_with_permuted_lengths_catches_a_baked_in_block_layout(monkeypatch):
    """The same check fails when the block table of the warm-up is reused for the replay (a layout baked into
    the graph): the check is sensitive to the lengths the replay reads."""
    from cmath_mer.bench.gpucheck.graphs import permuted_lengths_replay
    from cmath_mer.kernels.attention import fused

    from helpers import StandInGraphs
    first: dict = {}
    real = fused.prepare_block_indices

    def baked(cu, block, T):
        return first.setdefault((block, T), real(cu, block, T))
    monkeypatch.setattr(fused, "prepare_block_indices", baked)
    res = permuted_lengths_replay("cpu", graphs=StandInGraphs())
    assert not res["ok"] and any(not err <= 1e-2 for err in res["rel_err"].values()), res     # NaN too
