"""The stages that run the package as a user would: env, a profile of the training step, the demo on both
backends, the benchmark."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cmath_mer import bench as B
from cmath_mer.bench.cases import make_case
from cmath_mer.bench.gpucheck.common import guarded, run_child, training_stepper, write_json
from cmath_mer.model import config as model_config
from cmath_mer.model.cmath import CMATH

# ---------------------------------------------------------------------------------------------- profile

def stage_profile(args) -> dict:
    """Three profiled steps of Stepper (after three warm-up steps) per batch shape: the top ops by
    device time and by host time, and the count of host-device synchronisations (the step should have none)."""
    res = {}
    for name, lengths in (("mix16x100", [80 + (i * 37) % 60 for i in range(16)]), ("one4096", [4096])):
        if args.device != "cuda":
            lengths = [min(n, 12) for n in lengths[:3]]
        res[name] = guarded(lambda: _profile_shape(args, name, lengths))    # an error keeps the other shape's row
    return dict(ok=all("error" not in r for r in res.values()), **res)


def _profile_shape(args, name: str, lengths: list[int]) -> dict:
    cuda = args.device == "cuda"
    cfg = model_config.preset("iemocap", backend="triton")
    torch.manual_seed(0)
    model = CMATH(cfg).to(args.device).train()
    prec = "bf16" if cuda else "fp32"
    step = training_stepper(model, args.device, prec)
    batch = B.model_batch(cfg, lengths, args.device)
    for s in range(3):
        step([batch], 0, s)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for s in range(3, 6):
            step([batch], 0, s)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 3
    ka = prof.key_averages()
    dev_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables = {"by_device_time": ka.table(sort_by=dev_key, row_limit=30, max_name_column_width=70),
              "by_host_time": ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)}
    (Path(args.out) / f"profile_{name}.txt").write_text("\n\n".join(f"== {k} ==\n{v}" for k, v in tables.items()))
    syncs = {e.key: e.count for e in ka if any(w in e.key for w in ("Synchronize", "Memcpy", "item",
                                                                       "_local_scalar_dense"))}
    dev_total = sum(getattr(e, dev_key) for e in ka) / 3 / 1e3          # ms per step (self times)
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                    "cudaLaunchKernelExC", "cuLaunchKernelEx")) / 3
    return dict(utterances=sum(lengths), wall_ms_per_step=wall * 1e3, device_self_ms_per_step=dev_total,
                kernel_launches_per_step=launches, sync_like_calls=syncs)


# ------------------------------------------------------------------------------------------- demo training

def stage_train_demo(args) -> dict:
    out = Path(args.out) / "train_demo"
    curves = {}
    data = "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    if args.device != "cuda":                  # the interpreter is slow: a corpus of 6 short conversations
        data = str(out / "tiny.safetensors")
        p = run_child([sys.executable, "-m", "cmath_mer", "synth", "--conversations", "6", "--min-length", "4",
                       "--max-length", "12", data], args)
        if p.returncode != 0:
            return dict(ok=False, error=f"synth: {p.stderr[-2000:]}")
    backends = ("torch", "triton") if args.device == "cuda" else ("torch",)   # the CLI refuses triton on a CPU
    for backend in backends:
        run = out / backend
        # --overwrite: a rerun of this stage into the same --out replaces its own demo run (train refuses a
        # folder that holds one)
        cmd = [sys.executable, "-m", "cmath_mer", "train", "--data", data, "--epochs", "3", "--no-progress",
               "--device", args.device, "--backend", backend, "--out", str(run), "--seed", "0", "--overwrite"]
        t0 = time.perf_counter()
        p = run_child(cmd, args)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            return dict(ok=False, backend=backend, error=p.stderr[-2000:])
        hist = json.loads((run / "metrics.json").read_text()).get("history", [])
        curves[backend] = dict(wall_s=wall, train_loss=[h["train_loss"] for h in hist],
                               valid_wf1=[(h.get("valid") or {}).get("weighted_f1") for h in hist])
    if len(backends) == 1:
        return dict(ok=len(curves["torch"]["train_loss"]) == 3, curves=curves, note="torch only on a CPU")
    lt, lr = curves["torch"]["train_loss"], curves["triton"]["train_loss"]
    diff = max((abs(a - b) / max(abs(a), 1e-6) for a, b in zip(lt, lr) if a is not None and b is not None),
               default=float("inf"))
    return dict(ok=bool(diff < 0.05 and len(lt) == len(lr) == 3), max_rel_loss_diff=diff, curves=curves)


# ------------------------------------------------------------------------------------------------- bench

def bench_cases(device: str) -> list[dict]:
    c = []
    if device == "cuda":
        for N in (2048, 8192, 65536):
            for b in ("torch", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flex", "varlen", "triton"):
                if b in ("torch", "flex", "varlen") and N > 8192:
                    continue
                c.append(make_case("attention", b, N, batch="equal", D=32, S=2, dtype="bf16", device=device))
        for b in ("sdpa_flash", "sdpa_cudnn", "triton"):        # forward only, beside forward + backward
            c.append(make_case("attention", b, 8192, mode="fwd", batch="equal", D=32, S=2, dtype="bf16",
                               device=device))
        for batch in ("meld", "iemocap"):                       # the model's regime: many short conversations
            for b in ("sdpa_flash", "sdpa_cudnn", "flex", "varlen", "triton"):
                c.append(make_case("attention", b, 8192, batch=batch, D=32, S=2, dtype="bf16", device=device))
        for N in (32, 64):     # short conversations: the one-pass backward (triton) against the multi-kernel one
            for b in ("triton", "triton_multipass"):
                c.append(make_case("attention", b, N, batch="equal", D=32, S=2, dtype="bf16", device=device))
        for b in ("torch", "triton", "chunked"):
            c.append(make_case("reconstruction", b, 32768, batch="one", dtype="bf16", device=device))
            c.append(make_case("reconstruction", b, 32768, batch="one", dtype="fp32", device=device))
        for b in ("torch", "triton"):
            c.append(make_case("variational", b, 262144, batch="one", dtype="fp32", device=device))
            c.append(make_case("train_step", b, 100, mode="train", batch="mix16x100", D=32, device=device))
            c.append(make_case("train_step", b, 8192, mode="train", batch="one", D=32, device=device))
            # the 4,096-utterance engine steps belong to the targets stage: there the eager fp32 and compiled
            # references run in the same process as ours, so the targets' ratios come from one place
            c.append(make_case("engine_step", b, 100, mode="train", batch="mix16x100", D=32, dtype="bf16",
                               device=device))
        # the compiled baselines last: flex compiles per shape (tens of seconds), and the budget may run out
        c = [x for x in c if x["backend"] not in ("flex", "varlen")] + \
            [x for x in c if x["backend"] in ("flex", "varlen")]
    else:
        c.append(make_case("attention", "torch", 256, batch="equal", D=32, S=2, dtype="fp32", device=device))
        c.append(make_case("variational", "torch", 1024, batch="one", dtype="fp32", device=device))
    return c


def stage_bench(args) -> dict:
    """The cases run in this process, one after another (no per-case process start: GPU time is short)."""
    out = Path(args.out) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    results = dict(timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   device=args.device, quick=True, machine=B.machine_info(args.device),
                   ceilings=B.measure_ceilings(args.device, True), rows=[],
                   settings=dict(attention_heads=B.H_HEADS, reconstruction_K_M=[B.REC_K, B.REC_M],
                                 variational_C_Z=[B.VAR_C, B.VAR_Z], runner="gpucheck, in one process"))
    deadline = time.perf_counter() + args.bench_budget
    for case in bench_cases(args.device):
        if time.perf_counter() > deadline:
            results["rows"].append(dict(case, status="skipped", reason="gpucheck bench budget spent"))
            continue
        t0 = time.perf_counter()
        try:
            row = B.run_case(case, quick=True, warm_tiny=False)
        except Exception as err:                                       # noqa: BLE001
            row = dict(case, status="error", reason=f"{type(err).__name__}: {err}"[:400])
        row["wall_s"] = time.perf_counter() - t0
        results["rows"].append(row)
        print(B.progress_line(len(results["rows"]) - 1, 0, row), flush=True)
        write_json(out / "results.json", results)
    try:
        B.write_report(results, out)
    except Exception as err:                                           # noqa: BLE001
        results["report_error"] = f"{type(err).__name__}: {err}"
        write_json(out / "results.json", results)
    ok_rows = [r for r in results["rows"] if r.get("status") == "ok"]
    return dict(ok=len(ok_rows) == len(results["rows"]), rows=len(results["rows"]), ok_rows=len(ok_rows),
                errors=[(r["op"], r["backend"], r["N"], r.get("reason")) for r in results["rows"]
                        if r.get("status") != "ok"], ceilings=results["ceilings"])


# --------------------------------------------------------------------------------------------------- env

def stage_env(args) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), interpret=os.environ.get("TRITON_INTERPRET"))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    mem_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                                timeout=20).stdout[-3000:]
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = str(err)
    return dict(ok=args.device != "cuda" or info["cuda_available"], **info)


