"""Parity of the three ops on the device against float64 (every precision mode), the cold-autotune check and
the determinism check across two processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import torch

from cmath_mer import kernels
from cmath_mer.bench.calls import model_batch
from cmath_mer.bench.gpucheck.common import digest, guarded, rel_err, run_child, seconds_left, training_stepper
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.kernels.reconstruction.chunked import chunked_reconstruction_loss
from cmath_mer.kernels.variational.naive import naive_variational_fusion
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset

# ------------------------------------------------------------------------------------------------ parity

# (precision mode) -> (dtype name, allow TF32, tolerance vs float64). fp32 without TF32 takes the exact
# path (the PyTorch reference for the ops built on tl.dot, the Triton kernel for variational fusion).
MODES = {"fp32": ("float32", False, 1e-5), "tf32": ("float32", True, 5e-3),
         "fp16": ("float16", False, 5e-3), "bf16": ("bfloat16", False, 3e-2)}


def parity_cases(device: str) -> list[dict]:
    """Every case of the parity stage. On the CPU (interpreter) a small subset: no TF32, no bf16."""
    cuda = device == "cuda"
    modes = list(MODES) if cuda else ["fp32", "fp16"]
    att = [([1, 7, 64, 65, 200], 2, 2, 32, None), ([1, 7, 64, 65, 200], 2, 2, 32, 3),
           ([3, 130, 17], 3, 1, 64, None), ([70, 1, 129], 1, 2, 128, 5),
           ([700, 17, 390], 2, 2, 32, 100)]       # a window wide enough for interior (unmasked) key blocks
    # max_seqlen passed (the batch's bound, as the model passes it): the one-pass backward where the tile fits
    # (fused.onepass_max_rows: 16-bit 64 rows at D <= 32, 32 at D = 64, 128; TF32 32 at D >= 32)
    onepass = [([1, 7, 31, 32], 2, 2, 32, None), ([64, 3, 50, 1], 2, 2, 32, 5), ([5, 17, 30, 2], 3, 1, 64, 3),
               ([9, 32, 1], 1, 2, 128, None)]
    rec = [(257, 80, 256), (1000, 1582, 256), (33, 100, 64)]          # (T, M, K)
    var = [(3, 130, 33, True), (1, 7, 5, False), (2, 1000, 256, True)]  # (C, T, Z, sample)
    if not cuda:
        att, onepass, rec, var = att[:2], onepass[:1], rec[::2], var[:2]
    cases = []
    for mode in modes:
        cases += [dict(op="attention", mode=mode, lengths=L, S=S, H=H, D=D, window=w) for L, S, H, D, w in att]
        cases += [dict(op="attention", mode=mode, lengths=L, S=S, H=H, D=D, window=w, max_seqlen=True)
                  for L, S, H, D, w in onepass]
        cases += [dict(op="reconstruction", mode=mode, T=T, M=M, K=K) for T, M, K in rec]
        cases += [dict(op="reconstruction_chunked", mode=mode, T=T, M=M, K=K) for T, M, K in rec[:2]]
        cases += [dict(op="variational", mode=mode, C=C, T=T, Z=Z, sample=s, detach=True) for C, T, Z, s in var]
    cases.append(dict(op="reconstruction_exact", mode="fp32", T=4096, M=256, K=128))  # fp32 dots never in TF32
    cases.append(dict(op="variational", mode="fp32", C=3, T=65, Z=3, sample=True, detach=False))
    # an eps_offset that is not a multiple of 4 runs the kernel's misaligned-eps build (a rank's share at Z = 3)
    cases.append(dict(op="variational", mode="fp32", C=3, T=65, Z=3, sample=True, detach=False, eps_offset=7))
    return cases


def sized(case: dict, device: str) -> dict:
    """The case itself on CUDA; on the CPU (the interpreter, a smoke run of this module) a small version."""
    if device == "cuda":
        return case
    small = dict(case)
    for k, cap in (("T", 200), ("M", 100), ("Z", 32)):
        if k in small:
            small[k] = min(small[k], cap)
    if "lengths" in small:
        small["lengths"] = [min(n, 40) for n in small["lengths"]]
    if small["mode"] in ("bf16", "tf32"):
        small["mode"] = "fp32"                 # the interpreter has no TF32, and its bf16 is not the GPU's
    return small


def _leaf(x, device, dtype):
    return x.to(device=device, dtype=dtype).detach().requires_grad_()


def run_parity_case(case: dict, device: str, seed: int, fused_only: bool = False):
    """The op on `device` in the case's precision against float64 of the same (rounded) inputs on the CPU.
    fused_only: return the op's outputs and gradients instead (the determinism stage hashes them)."""
    dtype_name, tf32, tol = MODES[case["mode"]]
    if case["op"] == "reconstruction_exact":
        tol = 2e-3      # gradients are ~1e-3 residuals of O(1) products: fp32 gives ~2e-4, TF32 would give ~0.5
    dtype = getattr(torch, dtype_name)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    op = case["op"]
    no_grad: set[int] = set()
    if op == "attention":
        L, S, H, D = case["lengths"], case["S"], case["H"], case["D"]
        T = sum(L)
        host = [r(T, H, D), r(S, T, H, D), r(S, T, H, D)]
        cot = [r(T, H, D)]

        def fn(x, backend, dev):
            return [kernels.multi_source_attention(*x, cu_seqlens_from(L, device=dev), window=case["window"],
                                           max_seqlen=max(L) if case.get("max_seqlen") else None, backend=backend)]
    elif op in ("reconstruction", "reconstruction_exact", "reconstruction_chunked"):
        T, M, K = case["T"], case["M"], case["K"]
        h, w, b = r(T, K), r(M, K) / K ** 0.5, r(M)
        tgt = (h @ w.t() + b + 1e-3 * r(T, M)) if op == "reconstruction_exact" else r(T, M)
        host = [h, w, b, tgt]
        cot = [torch.tensor(1.0, dtype=torch.float64)]
        no_grad = {3}                                          # the target is data, as in the model

        def fn(x, backend, dev):
            if op == "reconstruction_chunked" and backend == "triton":   # the cuBLAS row-chunk design
                return [chunked_reconstruction_loss(*x)]
            if backend == "triton":                 # the Triton kernels themselves (auto runs the chunks on CUDA)
                from cmath_mer.kernels.reconstruction.fused import fused_reconstruction_loss
                return [fused_reconstruction_loss(*x)]
            return [kernels.reconstruction_loss(*x, backend=backend)]
    else:
        C, T, Z = case["C"], case["T"], case["Z"]
        host = [r(C, T, Z), r(C, T, Z)]
        cot = [r(T, Z), r(T, Z), r(T, Z), r(()), r(())]

        def fn(x, backend, dev):
            return list(kernels.variational_fusion(*x, seed=1234 + seed, sample=case["sample"],
                                           detach_teacher=case["detach"], backend=backend,
                                           eps_offset=case.get("eps_offset", 0)))
    rounded = [x.to(dtype).double() for x in host]           # the reference sees the inputs the op sees
    runs = [("fused", host, "triton", device, dtype)]
    if not fused_only:
        runs.append(("ref64", rounded, "torch", "cpu", torch.float64))
    results = {}
    for label, xs, backend, dev, dt in runs:
        inputs = [x.to(dev, dt) if i in no_grad else _leaf(x, dev, dt) for i, x in enumerate(xs)]
        leaves = [x for i, x in enumerate(inputs) if i not in no_grad]
        outs = fn(inputs, backend, dev)
        total = sum((o.float() * c.to(o.device).float()).sum() if dt != torch.float64 else (o * c).sum()
                    for o, c in zip(outs, cot))
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
        results[label] = [o.detach() for o in outs] + [gr if gr is not None else torch.zeros_like(x)
                                                       for gr, x in zip(grads, leaves)]
    if fused_only:
        return results["fused"]
    names = [f"out{i}" for i in range(len(cot))] + [f"grad{i}" for i in range(len(host)) if i not in no_grad]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, results["fused"], results["ref64"])}
    worst = max(errs.values())
    return dict(case, seed=seed, errors=errs, worst=worst, tol=tol, ok=bool(worst < tol))


def stage_parity(args) -> dict:
    """Cases split over --jobs worker processes (compiles are per process and dominate the time)."""
    cases = parity_cases(args.device)
    jobs = max(1, min(args.jobs, len(cases)))
    if args.worker is not None:
        i, n = args.worker
        rows = []
        for k, case in enumerate(cases):
            if k % n != i:
                continue
            try:
                rows.append(run_parity_case(case, args.device, seed=int(time.time_ns() % 100000) + k))
            except Exception as err:                                   # noqa: BLE001 - recorded
                rows.append(dict(case, ok=False, error=f"{type(err).__name__}: {err}"[:600],
                                 trace=traceback.format_exc()[-1500:]))
        print(json.dumps(rows, default=str))
        return {}
    procs = [subprocess.Popen([sys.executable, "-m", "cmath_mer.bench.gpucheck", "--stage", "parity", "--device",
                               args.device, "--worker", str(i), str(jobs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for i in range(jobs)]
    rows, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds_left(args))
        except subprocess.TimeoutExpired:               # stopped before the stage's limit: the others' rows count
            p.kill()
            out, err = p.communicate()
            err += "\n(stopped: the stage's time limit)"
        lines = [ln for ln in out.splitlines() if ln.startswith("[")]
        if p.returncode != 0 or not lines:
            errors.append(f"worker exit {p.returncode}: {err[-800:]}")
            continue
        rows += json.loads(lines[-1])
    bad = [r for r in rows if not r.get("ok")]
    return dict(ok=not bad and not errors and len(rows) == len(cases), cases=len(cases), ran=len(rows),
                failed=len(bad), worker_errors=errors, rows=rows)


# ------------------------------------------------------------------------------------------- cold autotune

def stage_autotune_cold(args) -> dict:
    """In this fresh process no autotune key has run: the first call of each must equal the reference.
    Then every config of the variational and reconstruction kernels runs in sequence on the same buffers
    (what the autotuner does) and the result after each must still equal the reference."""
    rows = []
    for case in [dict(op="variational", mode="fp32", C=3, T=5000, Z=256, sample=True, detach=True),
                 dict(op="variational", mode="bf16", C=2, T=777, Z=64, sample=False, detach=False),
                 dict(op="reconstruction", mode="bf16", T=3000, M=1582, K=256),
                 dict(op="reconstruction", mode="tf32", T=3000, M=100, K=64),
                 dict(op="attention", mode="bf16", lengths=[300, 17, 1000], S=2, H=8, D=32, window=None),
                 dict(op="attention", mode="fp16", lengths=[300, 17, 1000], S=3, H=4, D=64, window=9)]:
        try:
            rows.append(run_parity_case(sized(case, args.device), args.device, seed=7))
        except Exception as err:                                       # noqa: BLE001
            rows.append(dict(case, ok=False, error=f"{type(err).__name__}: {err}"[:600]))
    seq = guarded(lambda: _configs_in_sequence(args.device))          # the first calls' rows survive its error
    return dict(ok=all(r.get("ok") for r in rows) and seq.get("ok", False), first_calls=rows,
                configs_in_sequence=seq)


def _configs_in_sequence(device: str) -> dict:
    from cmath_mer.kernels.variational import fused as vf  # a Triton module
    launch = vf._fwd_launch
    configs = list(getattr(launch, "configs", [None]))
    g = torch.Generator().manual_seed(11)
    mu, lv = (torch.randn(3, 4099, 256, generator=g, dtype=torch.float64) for _ in range(2))
    ref = naive_variational_fusion(mu, lv, seed=5, sample=True)
    rows = []
    if configs == [None]:
        return dict(ok=True, note="interpreter: one config, nothing to sequence")
    saved = launch.configs
    try:
        for order in (configs, configs[::-1]):
            launch.configs = list(order)
            launch.cache.clear()
            out = vf.fused_variational_fusion(mu.float().to(device), lv.float().to(device), seed=5, sample=True)
            errs = [rel_err(a, b) for a, b in zip(out, ref)]
            rows.append(dict(order=[str(c) for c in order], best=str(getattr(launch, "best_config", None)),
                             errors=errs, ok=max(errs) < 1e-5))
    finally:
        launch.configs = saved
        launch.cache.clear()
    return dict(ok=all(r["ok"] for r in rows), rows=rows)


# ------------------------------------------------------------------------------------------- determinism

def _determinism_digest(device: str) -> dict:
    """Outputs and gradients of the three ops and of a model training step, as SHA-256 of their bytes."""
    out = {}
    for case in [dict(op="attention", mode="bf16", lengths=[300, 17, 1000, 64], S=2, H=8, D=32, window=None),
                 dict(op="attention", mode="fp16", lengths=[129, 1], S=3, H=2, D=64, window=4),
                 dict(op="reconstruction", mode="bf16", T=3000, M=1582, K=256),
                 dict(op="variational", mode="fp32", C=3, T=5000, Z=256, sample=True, detach=True)]:
        case = sized(case, device)
        out[f"{case['op']}_{case['mode']}"] = digest(run_parity_case(case, device, seed=3, fused_only=True))
    cfg = preset("iemocap", backend="triton")
    torch.manual_seed(0)
    model = CMATH(cfg).to(device).train()
    prec = "bf16" if device == "cuda" else "fp32"
    step = training_stepper(model, device, prec)
    meter = step.meter
    batch = model_batch(cfg, [37, 100, 5, 300] if device == "cuda" else [7, 20], device)
    for s in range(3):
        step([batch], 0, s)
    out["train_3_steps_params"] = digest([p for p in model.parameters()])
    out["train_3_steps_meter"] = digest([meter.sums])
    return out


def stage_determinism(args) -> dict:
    if args.worker is not None:
        print(json.dumps(_determinism_digest(args.device)))
        return {}
    runs = []
    for i in range(2):
        p = run_child([sys.executable, "-m", "cmath_mer.bench.gpucheck", "--stage", "determinism", "--device",
                       args.device, "--worker", str(i), "2"], args)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            return dict(ok=False, error=f"process {i} exit {p.returncode}: {p.stderr[-1500:]}")
        runs.append(json.loads(lines[-1]))
    same = {k: runs[0][k] == runs[1].get(k) for k in runs[0]}
    return dict(ok=all(same.values()), bitwise_equal=same, digests=runs)


