"""Host time of a long batch's training step (forward + backward) on the CPU, its CMA blocks recomputed in
split branches (the default) or through the selective checkpoint policy (what torch.compile traces).

    OMP_NUM_THREADS=1 python tools/recompute_host_time.py [--T 2048] [--d-model 32] [--steps 5]

The policy's TorchDispatchMode runs Python for every op of a recomputed branch, in the forward and again in
the recomputation; the split branches run none. At a small d_model the step is mostly host work (the ops'
dispatch), which is what a GPU step waits on; at the preset's size the CPU's arithmetic dominates. Prints one
line per mode: milliseconds per step (median of --steps, after one warm-up step) and the bytes the step keeps
for its backward (storages alive after the forward, as tests/model/test_split_recompute.py counts them).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cmath_mer.bench import model_batch
from cmath_mer.model import cma_transformer
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset


class _Produced(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        return out


def _forced(mode: str):
    """CMABlock.forward with every recomputed block in `mode`."""
    plain = cma_transformer.CMABlock.forward

    def forward(self, h, aux, cu_seqlens, recompute=False, max_seqlen=None):
        return plain(self, h, aux, cu_seqlens, mode if recompute else False, max_seqlen)
    return forward


def _kept_bytes(model, batch) -> int:
    produced = _Produced()
    with produced:
        loss = model(batch, seed=0).loss
    gc.collect()
    kept = sum(n for ref, n in produced.storages.values() if not ref.expired())
    loss.backward()
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048, help="utterances in the batch (recomputed from 2,048 on)")
    p.add_argument("--d-model", type=int, default=32, help="0: the preset's")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    small = dict(d_model=args.d_model, d_hidden=args.d_model, d_latent=args.d_model // 2) if args.d_model else {}
    cfg = preset("iemocap", backend="torch", recompute_from=args.T, **small)
    lengths = [64] * (args.T // 64) + ([args.T % 64] if args.T % 64 else [])
    batch = model_batch(cfg, lengths, "cpu")
    print(f"T {args.T}, d_model {cfg.d_model}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for mode in ("selective", "split"):
        cma_transformer.CMABlock.forward, plain = _forced(mode), cma_transformer.CMABlock.forward
        try:
            torch.manual_seed(0)
            model = CMATH(cfg).train()
            times = []
            for step in range(args.steps + 1):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                model(batch, seed=step).loss.backward()
                times.append(time.perf_counter() - t0)
            kept = _kept_bytes(model, batch)
        finally:
            cma_transformer.CMABlock.forward = plain
        print(f"{mode:9s}  {statistics.median(times[1:]) * 1e3:8.1f} ms/step   kept for the backward "
              f"{kept / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
