"""One command for a lent GPU: parity on CUDA, cold autotune, determinism, a CUDA-graph step, the demo on both
backends, the benchmark. Every stage runs in its own process with its own time limit and writes
DIR/<stage>.json (and .log), so one failing stage costs nothing of the others; summary.md is written last.

    python -m cmath_mer.gpucheck --out benchmarks/results/<date>-<card>     # on the GPU machine
    python -m cmath_mer.gpucheck --dry-run                                   # the plan (CI checks it)
    TRITON_INTERPRET=1 python -m cmath_mer.gpucheck --device cpu --out D     # the same code on the CPU, tiny

It reads nothing from the network and uses whatever torch and triton the machine carries.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

# (stage, what it checks, time limit in seconds on one H100). The limits add up to under 8 minutes.
STAGES = [
    ("env", "torch, triton, CUDA, driver and card; nvidia-smi", 30),
    ("parity", "the three ops on CUDA against float64: fp32 (exact path), fp32 with TF32, fp16, bf16; "
               "forward and every gradient, odd lengths", 150),
    ("autotune_cold", "a fresh process: the first call of every autotune key equals the reference "
                      "(stale partial sums), and every config run in sequence on the same buffers", 60),
    ("determinism", "ops and a model training step in two fresh processes: bitwise equal", 60),
    ("cuda_graph", "one whole training step (bf16 autocast, Triton ops, AdamW) captured in a CUDA graph; "
                   "replays equal eager steps", 45),
    ("graph_train", "--cuda-graphs: graphed steps equal eager ones (two shapes, a new seed and lr each step), "
                    "step times, and the demo trained both ways", 150),
    ("profile", "torch.profiler over train.py's step (Triton ops, bf16): where the time goes, host syncs", 60),
    ("train_demo", "the synthetic demo for 3 epochs on both backends; the loss curves agree", 100),
    ("bench", "ops, model and engine step, torch/SDPA/Triton, and the device's copy and matmul ceilings", 130),
]
STAGE_NAMES = [s[0] for s in STAGES]


# ------------------------------------------------------------------------------------------------ helpers

def rel_err(out, ref) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not bool((out.isfinite()).all()):
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def digest(tensors) -> str:
    """SHA-256 of the tensors' bytes (bitwise identity, whatever the dtype)."""
    import torch
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


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
           ([3, 130, 17], 3, 1, 64, None), ([70, 1, 129], 1, 2, 128, 5)]
    rec = [(257, 80, 256), (1000, 1582, 256), (33, 100, 64)]          # (T, M, K)
    var = [(3, 130, 33, True), (1, 7, 5, False), (2, 1000, 256, True)]  # (C, T, Z, sample)
    if not cuda:
        att, rec, var = att[:2], rec[::2], var[:2]
    cases = []
    for mode in modes:
        cases += [dict(op="attention", mode=mode, lengths=L, S=S, H=H, D=D, window=w) for L, S, H, D, w in att]
        cases += [dict(op="reconstruction", mode=mode, T=T, M=M, K=K) for T, M, K in rec]
        cases += [dict(op="reconstruction_chunked", mode=mode, T=T, M=M, K=K) for T, M, K in rec[:2]]
        cases += [dict(op="variational", mode=mode, C=C, T=T, Z=Z, sample=s, detach=True) for C, T, Z, s in var]
    cases.append(dict(op="reconstruction_exact", mode="fp32", T=4096, M=256, K=128))  # issue 8 fault 3
    cases.append(dict(op="variational", mode="fp32", C=3, T=65, Z=3, sample=True, detach=False))
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
    import torch

    from .kernels import multi_source_attention, reconstruction_loss, variational_fusion
    from .packing import cu_seqlens_from
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
            return [multi_source_attention(*x, cu_seqlens_from(L, device=dev), window=case["window"],
                                           backend=backend)]
    elif op in ("reconstruction", "reconstruction_exact", "reconstruction_chunked"):
        T, M, K = case["T"], case["M"], case["K"]
        h, w, b = r(T, K), r(M, K) / K ** 0.5, r(M)
        tgt = (h @ w.t() + b + 1e-3 * r(T, M)) if op == "reconstruction_exact" else r(T, M)
        host = [h, w, b, tgt]
        cot = [torch.tensor(1.0, dtype=torch.float64)]
        no_grad = {3}                                          # the target is data, as in the model

        def fn(x, backend, dev):
            if op == "reconstruction_chunked" and backend == "triton":   # the cuBLAS row-chunk design
                from .kernels.reconstruction.chunked import chunked_reconstruction_loss
                return [chunked_reconstruction_loss(*x)]
            return [reconstruction_loss(*x, backend=backend)]
    else:
        C, T, Z = case["C"], case["T"], case["Z"]
        host = [r(C, T, Z), r(C, T, Z)]
        cot = [r(T, Z), r(T, Z), r(T, Z), r(()), r(())]

        def fn(x, backend, dev):
            return list(variational_fusion(*x, seed=1234 + seed, sample=case["sample"],
                                           detach_teacher=case["detach"], backend=backend))
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
    procs = [subprocess.Popen([sys.executable, "-m", "cmath_mer.gpucheck", "--stage", "parity", "--device",
                               args.device, "--worker", str(i), str(jobs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy()) for i in range(jobs)]
    rows, errors = [], []
    for p in procs:
        out, err = p.communicate()
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
    seq = _configs_in_sequence(args.device)
    return dict(ok=all(r.get("ok") for r in rows) and seq.get("ok", False), first_calls=rows,
                configs_in_sequence=seq)


def _configs_in_sequence(device: str) -> dict:
    import torch

    from .kernels.variational import fused as vf
    from .kernels.variational.naive import naive_variational_fusion
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
    import torch

    from . import engine
    from .benchmark import _model_batch
    from .config import preset
    from .model import CMATH
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
    meter = engine.StepMeter(device)
    step = engine.Stepper(model, model, engine.make_optimizer(model, 1e-3, 0.01, prec),
                          engine.Precision(prec, device), 1.0, meter)
    batch = _model_batch(cfg, [37, 100, 5, 300] if device == "cuda" else [7, 20], device)
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
        p = subprocess.run([sys.executable, "-m", "cmath_mer.gpucheck", "--stage", "determinism", "--device",
                            args.device, "--worker", str(i), "2"], capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            return dict(ok=False, error=f"process {i} exit {p.returncode}: {p.stderr[-1500:]}")
        runs.append(json.loads(lines[-1]))
    same = {k: runs[0][k] == runs[1].get(k) for k in runs[0]}
    return dict(ok=all(same.values()), bitwise_equal=same, digests=runs)


# ------------------------------------------------------------------------------------------- CUDA graph

def stage_cuda_graph(args) -> dict:
    """The PyTorch whole-network capture recipe: warm up on a side stream, capture forward + backward +
    clip + AdamW(capturable) on static inputs, replay; compare with the same steps run eagerly."""
    import copy

    import torch

    from .benchmark import _model_batch
    from .config import preset
    from .model import CMATH
    if args.device != "cuda":
        return dict(ok=True, skipped="CUDA graphs need a CUDA device")
    dev = torch.device("cuda")
    # dropout off: a graph replay draws new dropout masks from the graph's own RNG offsets, so only a step
    # without dropout can be compared with eager steps (the variational eps is a function of the seed)
    cfg = preset("iemocap", backend="triton", dropout=0.0, input_dropout=0.0)
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev).train()
    twin = copy.deepcopy(model)
    batch = _model_batch(cfg, [37, 100, 5, 300, 64], dev)

    def make_step(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, capturable=True)

        def step():
            opt.zero_grad(set_to_none=False)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(batch, seed=17).loss.float()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            return loss.detach()
        return step

    eager, graphed = make_step(twin), make_step(model)
    res: dict = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):                                     # warm-up: autotune, allocator, AdamW state
            graphed()
            eager()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            static_loss = graphed()
    except Exception as err:                                   # noqa: BLE001 - the finding
        return dict(ok=False, captured=False, error=f"{type(err).__name__}: {err}"[:1500],
                    trace=traceback.format_exc()[-2500:])
    losses_g, losses_e = [], []
    for _ in range(5):
        g.replay()
        losses_g.append(static_loss.clone())
        losses_e.append(eager())
    torch.cuda.synchronize()
    lg, le = torch.stack(losses_g).tolist(), torch.stack(losses_e).tolist()
    # all parameters as one vector: a zero-initialised bias alone has O(1) relative differences
    perr = rel_err(torch.cat([p.detach().flatten() for p in model.parameters()]),
                   torch.cat([p.detach().flatten() for p in twin.parameters()]))
    t = {}
    for name, fn in (("graph_replay", g.replay), ("eager", eager)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t[name + "_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    res.update(ok=bool(perr < 1e-3 and all(abs(a - b) <= 1e-3 * abs(b) + 1e-4 for a, b in zip(lg, le))),
               captured=True, losses_graph=lg, losses_eager=le, param_rel_err_after_5=perr,
               utterances=batch.num_utterances, step_time=t)
    return res


# -------------------------------------------------------------------------------------- graphed training

def _graph_equality(dev) -> dict:
    """Eager engine.Stepper and GraphedStepper from one initialisation, dropout off, two batch shapes
    alternating, a new variational seed and learning rate every step: the parameters must agree."""
    import copy

    import torch

    from . import engine
    from .benchmark import _model_batch
    from .config import preset
    from .graphed_step import GraphedStepper, make_capturable
    from .model import CMATH
    cfg = preset("iemocap", backend="triton", dropout=0.0, input_dropout=0.0)
    torch.manual_seed(0)
    a = CMATH(cfg).to(dev).train()
    b = copy.deepcopy(a)
    prec = engine.Precision("bf16", dev)
    eager = engine.Stepper(a, a, engine.make_optimizer(a, 1e-3, 0.01, "bf16"), prec, 1.0, engine.StepMeter(dev))
    graphed = GraphedStepper(b, engine.make_optimizer(b, 1e-3, 0.01, "bf16"), prec, 1.0, engine.StepMeter(dev))
    make_capturable(eager.optimizer, dev)        # the same AdamW arithmetic on both sides (lr in a tensor)
    shapes = [[37, 100, 5], [300], [37, 100, 5], [300], [37, 100, 5], [300], [37, 100, 5], [300]]
    for step, lengths in enumerate(shapes):
        batch = _model_batch(cfg, lengths, dev, seed=step)
        for st in (eager, graphed):
            for group in st.optimizer.param_groups:
                group["lr"].fill_(1e-3 * 0.5 ** (step // 2))
            st([batch], 7, step)
    torch.cuda.synchronize()
    flat = [torch.cat([p.detach().flatten().double() for p in m.parameters()]) for m in (a, b)]
    err = rel_err(flat[1], flat[0])
    ma, mb = eager.meter.read(), graphed.meter.read()
    return dict(param_rel_err=err, bitwise=bool(torch.equal(flat[0], flat[1])), captured=graphed.captured,
                replayed=graphed.replayed, loss_sum_eager=ma["loss_sum"], loss_sum_graphed=mb["loss_sum"],
                ok=bool(err < 1e-5 and graphed.captured == 2 and graphed.replayed == 6))


def _graph_timing(dev) -> dict:
    import torch

    from . import engine
    from .benchmark import _model_batch
    from .config import preset
    from .graphed_step import GraphedStepper
    from .model import CMATH
    out = {}
    for name, lengths in (("mix16x100", [80 + (i * 37) % 60 for i in range(16)]), ("one4096", [4096])):
        cfg = preset("iemocap", backend="triton")
        row = {"utterances": sum(lengths)}
        for kind in ("eager", "graphs"):
            torch.manual_seed(0)
            model = CMATH(cfg).to(dev).train()
            opt = engine.make_optimizer(model, 1e-3, 0.01, "bf16")
            prec, meter = engine.Precision("bf16", dev), engine.StepMeter(dev)
            st = (GraphedStepper(model, opt, prec, 1.0, meter) if kind == "graphs"
                  else engine.Stepper(model, model, opt, prec, 1.0, meter))
            batch = _model_batch(cfg, lengths, dev)
            for s in range(3):
                st([batch], 0, s)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(3, 23):
                st([batch], 0, s)
            torch.cuda.synchronize()
            row[f"{kind}_ms"] = (time.perf_counter() - t0) / 20 * 1e3
            row[f"{kind}_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
            torch.cuda.reset_peak_memory_stats(dev)
        row["speedup"] = row["eager_ms"] / row["graphs_ms"]
        out[name] = row
    return out


def stage_graph_train(args) -> dict:
    if args.device != "cuda":
        return dict(ok=True, skipped="CUDA graphs need a CUDA device (tests/test_graphed_step.py covers the rest)")
    import torch
    dev = torch.device("cuda")
    res: dict = {}
    try:
        res["equality"] = _graph_equality(dev)
    except Exception as err:                                           # noqa: BLE001 - the finding
        res["equality"] = dict(ok=False, error=f"{type(err).__name__}: {err}"[:1500],
                               trace=traceback.format_exc()[-2500:])
    try:
        res["timing"] = _graph_timing(dev)
    except Exception as err:                                           # noqa: BLE001
        res["timing"] = dict(error=f"{type(err).__name__}: {err}"[:1500], trace=traceback.format_exc()[-2500:])
    out = Path(args.out) / "graph_train"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for flag in ("--no-cuda-graphs", "--cuda-graphs"):
        run = out / flag.strip("-")
        p = subprocess.run([sys.executable, "-m", "cmath_mer", "train", "--data", "synthetic", "--epochs", "3",
                            "--no-progress", "--device", "cuda", "--backend", "triton", flag, "--out", str(run)],
                           capture_output=True, text=True)
        (out / f"{flag.strip('-')}.log").write_text(p.stdout[-20000:] + "\n--- stderr ---\n" + p.stderr[-20000:])
        if p.returncode != 0:
            runs[flag] = dict(error=p.stderr[-1500:])
            continue
        hist = json.loads((run / "metrics.json").read_text())["history"]
        runs[flag] = dict(train_loss=[h["train_loss"] for h in hist],
                          utt_per_s=[h["utterances_per_second"] for h in hist],
                          valid_wf1=[(h.get("valid") or {}).get("weighted_f1") for h in hist],
                          graph_lines=[ln for ln in p.stdout.splitlines() if ln.startswith("CUDA graphs")])
    res["demo"] = runs
    e, g = runs.get("--no-cuda-graphs", {}), runs.get("--cuda-graphs", {})
    demo_ok = ("train_loss" in e and "train_loss" in g and
               all(abs(x - y) <= 0.1 * abs(x) for x, y in zip(e["train_loss"], g["train_loss"])))
    res["ok"] = bool(res["equality"].get("ok") and demo_ok and "error" not in res["timing"])
    return res


# ---------------------------------------------------------------------------------------------- profile

def stage_profile(args) -> dict:
    """Three profiled steps of engine.Stepper (after three warm-up steps) per batch shape: the top ops by
    device time and by host time, and the count of host-device synchronisations (the step should have none)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import engine
    from .benchmark import _model_batch
    from .config import preset
    from .model import CMATH
    cuda = args.device == "cuda"
    out = Path(args.out)
    res = {}
    for name, lengths in (("mix16x100", [80 + (i * 37) % 60 for i in range(16)]), ("one4096", [4096])):
        if not cuda:
            lengths = [min(n, 12) for n in lengths[:3]]
        cfg = preset("iemocap", backend="triton")
        torch.manual_seed(0)
        model = CMATH(cfg).to(args.device).train()
        prec = "bf16" if cuda else "fp32"
        meter = engine.StepMeter(args.device)
        step = engine.Stepper(model, model, engine.make_optimizer(model, 1e-3, 0.01, prec),
                              engine.Precision(prec, args.device), 1.0, meter)
        batch = _model_batch(cfg, lengths, args.device)
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
        (out / f"profile_{name}.txt").write_text("\n\n".join(f"== {k} ==\n{v}" for k, v in tables.items()))
        syncs = {e.key: e.count for e in ka if any(w in e.key for w in ("Synchronize", "Memcpy", "item",
                                                                           "_local_scalar_dense"))}
        dev_total = sum(getattr(e, dev_key) for e in ka) / 3 / 1e3          # ms per step (self times)
        launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                        "cudaLaunchKernelExC", "cuLaunchKernelEx")) / 3
        res[name] = dict(utterances=sum(lengths), wall_ms_per_step=wall * 1e3,
                         device_self_ms_per_step=dev_total, kernel_launches_per_step=launches,
                         sync_like_calls=syncs)
    return dict(ok=True, **res)


# ------------------------------------------------------------------------------------------- demo training

def stage_train_demo(args) -> dict:
    out = Path(args.out) / "train_demo"
    curves = {}
    data = "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    if args.device != "cuda":                  # the interpreter is slow: a corpus of 6 short conversations
        data = str(out / "tiny.safetensors")
        subprocess.run([sys.executable, "-m", "cmath_mer", "synth", "--conversations", "6", "--min-length", "4",
                        "--max-length", "12", data], check=True, capture_output=True)
    backends = ("torch", "triton") if args.device == "cuda" else ("torch",)   # the CLI refuses triton on a CPU
    for backend in backends:
        run = out / backend
        cmd = [sys.executable, "-m", "cmath_mer", "train", "--data", data, "--epochs", "3", "--no-progress",
               "--device", args.device, "--backend", backend, "--out", str(run), "--seed", "0"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
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
    from .benchmark import _case
    c = []
    if device == "cuda":
        for N in (2048, 8192, 65536):
            for b in ("torch", "sdpa_flash", "sdpa_efficient", "flex", "varlen", "triton"):
                if b in ("torch", "flex", "varlen") and N > 8192:
                    continue
                c.append(_case("attention", b, N, batch="equal", D=32, S=2, dtype="bf16", device=device))
        for b in ("torch", "triton", "chunked"):
            c.append(_case("reconstruction", b, 32768, batch="one", dtype="bf16", device=device))
            c.append(_case("reconstruction", b, 32768, batch="one", dtype="fp32", device=device))
        for b in ("torch", "triton"):
            c.append(_case("variational", b, 262144, batch="one", dtype="fp32", device=device))
            c.append(_case("train_step", b, 100, mode="train", batch="mix16x100", D=32, device=device))
            c.append(_case("train_step", b, 8192, mode="train", batch="one", D=32, device=device))
            for batch, N in (("mix16x100", 100), ("one", 4096)):
                c.append(_case("engine_step", b, N, mode="train", batch=batch, D=32, dtype="bf16", device=device))
        c.append(_case("engine_step", "torch", 4096, mode="train", batch="one", D=32, dtype="fp32", device=device))
        # the compiled baselines last: flex compiles per shape (tens of seconds), and the budget may run out
        c = [x for x in c if x["backend"] not in ("flex", "varlen")] + \
            [x for x in c if x["backend"] in ("flex", "varlen")]
    else:
        c.append(_case("attention", "torch", 256, batch="equal", D=32, S=2, dtype="fp32", device=device))
        c.append(_case("variational", "torch", 1024, batch="one", dtype="fp32", device=device))
    return c


def stage_bench(args) -> dict:
    """The cases run in this process, one after another (no per-case process start: the lease is short)."""
    from . import benchmark as B
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
        print(B._progress_line(len(results["rows"]) - 1, 0, row), flush=True)
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
    import platform

    import torch
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


# ------------------------------------------------------------------------------------------------ driver

def run_stage(name: str, args) -> dict:
    return globals()[f"stage_{name}"](args)


def _summary_md(out: Path, results: dict) -> str:
    env = results.get("env", {})
    lines = [f"# GPU check, {results['started']}", "",
             f"{env.get('gpu', 'CPU')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA "
             f"{env.get('cuda')}", "", "| stage | result | seconds | checks |", "| --- | --- | --- | --- |"]
    for name, what, _ in STAGES:
        r = results.get(name)
        if r is None:
            continue
        verdict = "PASS" if r.get("ok") else ("TIMEOUT" if r.get("timeout") else "FAIL")
        lines.append(f"| {name} | {verdict} | {r.get('seconds', 0):.0f} | {what} |")
    par = results.get("parity", {})
    if par.get("rows"):
        lines += ["", "## Parity (worst relative error vs float64, per case)", "",
                  "| op | mode | shape | worst | tol | ok |", "| --- | --- | --- | --- | --- | --- |"]
        for r in par["rows"]:
            shape = {k: r[k] for k in ("lengths", "S", "H", "D", "window", "T", "M", "K", "C", "Z", "sample")
                     if k in r}
            lines.append(f"| {r['op']} | {r['mode']} | {shape} | {r.get('worst', r.get('error'))} | "
                         f"{r.get('tol')} | {r.get('ok')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmath_mer.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results folder (default benchmarks/results/<date>-<card>)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma-separated subset, in order")
    p.add_argument("--dry-run", action="store_true", help="print the plan and check it, run nothing")
    p.add_argument("--jobs", type=int, default=8, help="parity worker processes")
    p.add_argument("--bench-budget", type=float, default=95.0, help="seconds for the bench cases")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {STAGE_NAMES}")
    if args.dry_run:
        for name, what, limit in STAGES:
            if name in stages:
                print(f"{name:14s} {limit:4d} s  {what}")
        print(f"plan: {len(parity_cases('cuda'))} parity cases on CUDA, {len(bench_cases('cuda'))} bench cases")
        print(f"total limit: {sum(s[2] for s in STAGES if s[0] in stages)} s")
        return 0
    if args.stage:                                     # inside a stage's process
        res = run_stage(args.stage, args)
        if args.worker is None:
            print("RESULT " + json.dumps(res, default=str))
        return 0
    if args.out is None:
        import torch
        card = (torch.cuda.get_device_name(0).split()[1].lower() if args.device == "cuda" else "cpu")
        args.out = f"benchmarks/results/{_dt.date.today().isoformat()}-{card}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), device=args.device)
    # the limits are sized for one H100; the interpreter on a CPU runs the small cases slower
    limits = {n: lim * (1 if args.device == "cuda" else 4) for n, _, lim in STAGES}
    for name in stages:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "cmath_mer.gpucheck", "--stage", name, "--device", args.device,
               "--out", str(out), "--jobs", str(args.jobs), "--bench-budget", str(args.bench_budget)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limits[name])
            (out / f"{name}.log").write_text(proc.stdout[-200000:] + "\n--- stderr ---\n" + proc.stderr[-200000:])
            got = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            res = json.loads(got[-1]) if got else dict(ok=False, error=f"exit {proc.returncode}: "
                                                                         f"{proc.stderr[-1500:]}")
        except subprocess.TimeoutExpired as err:
            (out / f"{name}.log").write_text(str(err.stdout or "")[-200000:] + "\n--- stderr ---\n"
                                             + str(err.stderr or "")[-200000:])
            res = dict(ok=False, timeout=True, error=f"over its {limits[name]} s limit")
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        write_json(out / f"{name}.json", res)
        print(f"{name:14s} {'PASS' if res.get('ok') else 'FAIL'}  {res['seconds']:6.1f} s", flush=True)
        write_json(out / "summary.json", results)
        (out / "summary.md").write_text(_summary_md(out, results))
    return 0 if all(results[n].get("ok") for n in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
