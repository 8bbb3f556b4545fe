"""CUDA graphs: one captured training step against eager steps, and --cuda-graphs (graphed_step.py) against
Stepper, with step times and the demo trained both ways."""
from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from cmath_mer.bench.calls import model_batch
from cmath_mer.bench.gpucheck.common import guarded, rel_err, run_child, training_stepper
from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset
from cmath_mer.training.graphs import CudaGraphs, make_capturable

# ------------------------------------------------------------------------------------------- CUDA graph

def stage_cuda_graph(args) -> dict:
    """The PyTorch whole-network capture recipe: warm up on a side stream, capture forward + backward +
    clip + AdamW(capturable) on static inputs, replay; compare with the same steps run eagerly."""
    if args.device != "cuda":
        return dict(ok=True, skipped="CUDA graphs need a CUDA device")
    dev = torch.device("cuda")
    # dropout off: a graph replay draws new dropout masks from the graph's own RNG offsets, so only a step
    # without dropout can be compared with eager steps (the variational eps is a function of the seed)
    cfg = preset("iemocap", backend="triton", dropout=0.0, input_dropout=0.0)
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev).train()
    twin = copy.deepcopy(model)
    batch = model_batch(cfg, [37, 100, 5, 300, 64], dev)

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
    failed = guarded(lambda: _warm_up(graphed, eager))         # None, or the error as the stage's finding
    if failed:
        return dict(ok=False, captured=False, where="warm-up", **failed)
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


def _warm_up(*steps) -> None:
    """The capture recipe's warm-up, on a side stream: autotune, the allocator, AdamW's state."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for step in steps:
                step()
    torch.cuda.current_stream().wait_stream(side)


# -------------------------------------------------------------------------------------- graphed training

MASKS_DIFFER = 1e-3        # relative parameter difference above which two steppers drew other dropout masks


def steppers_agree(cfg, shapes: list[list[int]], dev, graphs=None) -> dict:
    """Eager Stepper and GraphedStepper from one initialisation, on batches of `shapes` in turn, a new
    variational seed and learning rate every step, and every generator seeded alike before each step on both
    sides, so dropout draws the same masks in both (a replay after torch.manual_seed(s) draws what an eager step
    from s draws): their parameters after the last step, and how many steps were captured and replayed.
    graphs: graphed_step's CUDA graph API, or a stand-in (tests). The graphed steps are not padded: a padded
    batch draws its dropout masks over more rows (tests/training/test_graphed_padding.py checks padding)."""
    torch.manual_seed(0)
    a = CMATH(cfg).to(dev).train()
    b = copy.deepcopy(a)
    eager = training_stepper(a, dev, "bf16")
    graphed = training_stepper(b, dev, "bf16", graphed=True, graphs=graphs, pad=False)
    make_capturable(eager.optimizer, dev)        # the same AdamW arithmetic on both sides (lr in a tensor)
    for step, lengths in enumerate(shapes):
        batch = model_batch(cfg, lengths, dev, seed=step)
        for st in (eager, graphed):
            for group in st.optimizer.param_groups:
                group["lr"].fill_(1e-3 * 0.5 ** (step // 2))
            torch.manual_seed(1000 + step)
            st([batch], 7, step)
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
    flat = [torch.cat([p.detach().flatten().double() for p in m.parameters()]) for m in (a, b)]
    ma, mb = eager.meter.read(), graphed.meter.read()
    return dict(param_rel_err=rel_err(flat[1], flat[0]), bitwise=bool(torch.equal(flat[0], flat[1])),
                captured=graphed.captured, replayed=graphed.replayed, loss_sum_eager=ma["loss_sum"],
                loss_sum_graphed=mb["loss_sum"])


def _graph_equality(dev) -> dict:
    """Dropout off, two batch shapes alternating: the replays read each step's batch, seed and learning rate."""
    cfg = preset("iemocap", backend="triton", dropout=0.0, input_dropout=0.0)
    res = steppers_agree(cfg, [[37, 100, 5], [300]] * 4, dev)
    res["ok"] = bool(res["param_rel_err"] < 1e-5 and res["captured"] == 2 and res["replayed"] == 6)
    return res


def _graph_equality_recompute(dev) -> dict:
    """Dropout on, one batch long enough to be recomputed in the backward (recompute_from: selective
    checkpointing of the CMA blocks, the fusion in pieces): a replayed backward must redraw its forward's
    dropout masks, which needs torch.utils.checkpoint to rewind the CUDA generator inside a capture (PyTorch
    #162504, fixed by #162505); a graph whose recomputation drew new masks would train on wrong gradients.
    Other masks move the parameters by ~1e-2 (relative, after two replays; ~1e-2 also on the CPU stand-in,
    tests/bench/test_gpucheck.py), while the two steppers' loss normalisations may differ in the last bits (the eager
    one divides by the step's totals): ~3e-5 at some sizes on the CPU. Hence 1e-3, and `bitwise` beside it."""
    cfg = preset("iemocap", backend="triton")
    res = steppers_agree(cfg, [[cfg.recompute_from + 52]] * 3, dev)
    res["ok"] = bool(res["param_rel_err"] < MASKS_DIFFER and res["captured"] == 1 and res["replayed"] == 2)
    return res


PERMUTED_LENGTHS = ([100, 28, 61, 7], [28, 7, 100, 61])   # captured, then replayed: other blocks per program


def permuted_lengths_replay(dev, graphs=None) -> dict:
    """PyTorch's capture recipe on the attention op (Triton, forward and backward): warm up and capture on static
    inputs of one batch's lengths, then write a permutation of them into the static cu_seqlens in place
    (`.data`: no version bump, as a static input between replays) and new q, k, v, do, and replay. o, dq, dk,
    dv must match an eager call on fresh tensors: a graph that baked in the warm-up's block layout computes
    the wrong blocks and leaves rows unwritten. graphs: graphed_step.CudaGraphs, or a stand-in (tests)."""
    dev = torch.device(dev)
    graphs = graphs if graphs is not None else CudaGraphs(dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32       # fp32: the interpreter (tests)
    first, permuted = PERMUTED_LENGTHS
    S, H, D = 2, 2, 32
    T = sum(first)
    g = torch.Generator(device=dev).manual_seed(int(torch.randint(0, 2**31, ())))

    def draw():
        return {"q": torch.randn(T, H, D, device=dev, generator=g, dtype=dtype),
                "k": torch.randn(S, T, H, D, device=dev, generator=g, dtype=dtype),
                "v": torch.randn(S, T, H, D, device=dev, generator=g, dtype=dtype),
                "do": torch.randn(T, H, D, device=dev, generator=g, dtype=dtype)}

    def run(x, cu) -> dict:
        q, k, v = (x[n].detach().requires_grad_() for n in "qkv")
        o = multi_source_attention(q, k, v, cu, backend="triton")
        return dict(zip(("o", "dq", "dk", "dv"), (o.detach(), *torch.autograd.grad(o, (q, k, v), x["do"]))))

    static, cu = draw(), cu_seqlens_from(first).to(dev)
    out: dict = {}
    for _ in range(2):
        graphs.eager(lambda: run(static, cu))
    graph = graphs.capture(lambda: out.update(run(static, cu)))
    cu.data.copy_(cu_seqlens_from(permuted).to(dev))
    for name, x in draw().items():
        static[name].copy_(x)
    graph.replay()
    want = run({n: x.clone() for n, x in static.items()}, cu_seqlens_from(permuted).to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    errs = {name: rel_err(out[name], want[name]) for name in want}
    return dict(ok=all(e < 1e-3 for e in errs.values()), rel_err=errs, lengths=[first, permuted],
                bitwise=all(torch.equal(out[n], want[n]) for n in want))


def _graph_timing(dev) -> dict:
    out = {}
    for name, lengths in (("mix16x100", [80 + (i * 37) % 60 for i in range(16)]), ("one4096", [4096])):
        cfg = preset("iemocap", backend="triton")
        row = {"utterances": sum(lengths)}
        for kind in ("eager", "graphs"):
            torch.manual_seed(0)
            model = CMATH(cfg).to(dev).train()
            st = training_stepper(model, dev, "bf16", graphed=kind == "graphs")
            batch = model_batch(cfg, lengths, dev)
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
        return dict(ok=True, skipped="CUDA graphs need a CUDA device (tests/training/test_graphed_step.py covers "
                                     "the rest)")
    dev = torch.device("cuda")
    res: dict = {}
    for name, check in (("equality", _graph_equality), ("equality_recompute", _graph_equality_recompute),
                        ("replay_permuted_lengths", permuted_lengths_replay)):
        res[name] = {"ok": False, **guarded(lambda: check(dev))}          # an error is the check's finding
    res["timing"] = guarded(lambda: _graph_timing(dev))
    out = Path(args.out) / "graph_train"
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for flag in ("--no-cuda-graphs", "--cuda-graphs"):
        run = out / flag.strip("-")
        # --overwrite: a rerun of this stage into the same --out replaces its own demo run (train refuses a
        # folder that holds one)
        p = run_child([sys.executable, "-m", "cmath_mer", "train", "--data", "synthetic", "--epochs", "3",
                       "--no-progress", "--device", "cuda", "--backend", "triton", flag, "--out", str(run),
                       "--overwrite"], args)
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
    res["ok"] = bool(res["equality"].get("ok") and res["equality_recompute"].get("ok")
                     and res["replay_permuted_lengths"].get("ok") and demo_ok
                     and "error" not in res["timing"])
    return res


