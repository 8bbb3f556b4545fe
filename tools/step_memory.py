"""What is alive at the peak of one CMATH training step: live tensor bytes tracked op by op.

    OMP_NUM_THREADS=1 python tools/step_memory.py --T 16384 [--preset iemocap] [--text-only] [--top 40]

A TorchDispatchMode sees every aten op of the step (forward, the backward the autograd engine runs in this
thread, the recomputation of checkpointed regions) and keeps a weak reference to the storage of every
tensor an op returns. After each op it sums the bytes of the storages still alive; at the highest sum it
records them with the op that made each one and the phase (forward / backward). Inputs, parameters and
optimizer state exist before the step and are not counted: the number is "above setup", as the benchmark's
VmHWM - RSS after setup is (which also counts allocator slack, so it reads a little higher).
Memory of a windowed step is linear in T, so the count of (T, d) tensors at the peak carries over to any T.

It also samples the process's RSS after each op. At small T that reads far above the live tensors: most
tensors are then under 32 MiB, which glibc serves from its heap and keeps when freed (the iemocap step at
T = 16,384: ~2.2 GiB of RSS above setup, as the benchmark's VmHWM also says, against 0.6 GiB of live
tensors). From T ~ 131,072 on, (T, d) tensors are mapped on their own and returned at free, and the live
count is what the measured peak follows (at 262,144: 32 (T, 256) tensors measured, ~31 counted here at
16,384). A gap that stays at large T is the heap keeping blocks that a step allocates many times over
(the fusion's pieces were such a case: see VariationalFusion.forward_recomputed).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}   # setup: never counted
        self.live: dict[int, tuple] = {}       # storage key -> (weakref, nbytes, op, shape, dtype, phase)
        self.phase = "forward"
        self.peak = 0
        self.peak_at: list[tuple] = []
        self.peak_op = None
        self.n_ops = 0
        self.rss_peak = (0, None, 0)          # (RSS, op, tracked bytes then): what the process held, sampled
        self.page = os.sysconf("SC_PAGE_SIZE")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n_ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                s = t.untyped_storage()
                key = s.data_ptr()
                old = self.live.get(key)
                # an address can be freed and handed out again within one op: a dead entry is replaced
                if key and (old is None or old[0].expired()) and key not in self.existing:
                    self.live[key] = (StorageWeakRef(s), s.nbytes(), str(func), tuple(t.shape), t.dtype,
                                      self.phase)
        total = 0
        for key in [k for k, v in self.live.items() if v[0].expired()]:
            del self.live[key]
        for v in self.live.values():
            total += v[1]
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * self.page
        if rss > self.rss_peak[0]:
            self.rss_peak = (rss, (str(func), self.phase), total)
        if total > self.peak:
            self.peak = total
            self.peak_op = (str(func), self.phase)
            self.peak_at = [v[1:] for v in self.live.values()]
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=16384)
    p.add_argument("--preset", default="iemocap")
    p.add_argument("--text-only", action="store_true")
    p.add_argument("--text-dim", type=int, default=None)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--fusion-rows", type=int, help="rows per recomputed piece of the fusion (default: "
                   "variational_fusion.RECOMPUTE_ROWS); a small value shows at small T the peak of a large T")
    a = p.parse_args(argv)
    from cmath_mer.bench.calls import model_batch
    from cmath_mer.model.cmath import CMATH
    from cmath_mer.model.config import preset
    torch.set_num_threads(1)
    if a.fusion_rows:
        import cmath_mer.model.fusion as vf
        vf.RECOMPUTE_ROWS = a.fusion_rows
    cfg = preset(a.preset, backend="torch", window=a.window)
    if a.text_only:
        cfg = preset(a.preset, backend="torch", window=a.window, modalities=("text",),
                     input_dims={"text": a.text_dim or cfg.input_dims["text"]})
    torch.manual_seed(0)
    model = CMATH(cfg).train()
    model(model_batch(cfg, [8, 8], "cpu", seed=1), seed=0).loss.backward()   # first-call costs, as the benchmark
    model.zero_grad(set_to_none=True)
    batch = model_batch(cfg, [a.T], "cpu")
    d = cfg.d_model
    unit = a.T * d * 4
    existing = [*model.parameters(), *model.buffers(), *batch.features.values(), batch.speakers, batch.labels,
                batch.cu_seqlens]
    with open("/proc/self/statm") as f:
        rss0 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    mode = LiveBytes(existing)
    with mode:
        out = model(batch, seed=0)
        mode.phase = "backward"
        out.loss.backward()
    print(f"T={a.T} preset={a.preset} modalities={cfg.modalities} d={d} ops={mode.n_ops}")
    print(f"peak above setup: {mode.peak / 2**20:.1f} MiB = {mode.peak / unit:.1f} (T, {d}) fp32 tensors; "
          f"at op {mode.peak_op[0]} ({mode.peak_op[1]})")
    rss, op, tracked = mode.rss_peak
    print(f"RSS sampled after each op: peak {(rss - rss0) / unit:.1f} units above setup at {op[0]} ({op[1]}), "
          f"when the tracked tensors held {tracked / unit:.1f}")
    groups = collections.defaultdict(lambda: [0, 0])
    for nbytes, op, shape, dtype, phase in mode.peak_at:
        g = groups[(op, shape, str(dtype).replace("torch.", ""), phase)]
        g[0] += 1
        g[1] += nbytes
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    print(f"{'units':>6} {'count':>5}  op, shape, dtype, phase")
    for (op, shape, dtype, phase), (count, nbytes) in rows[:a.top]:
        print(f"{nbytes / unit:6.2f} {count:5d}  {op} {shape} {dtype} {phase}")
    rest = sum(v[1] for _, v in rows[a.top:])
    print(f"{rest / unit:6.2f}   ...  the rest ({len(rows) - a.top} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
