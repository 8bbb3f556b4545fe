"""Host time of a long batch's training step (forward + backward) on the CPU, its CMA blocks recomputed in
split branches (the default) or through the selective checkpoint policy (what torch.compile traces).

    OMP_NUM_THREADS=1 python tools/recompute_host_time.py [--T 2048] [--d-model 32] [--rounds 5]

The policy's TorchDispatchMode runs Python for every op of a recomputed branch, in the forward and again in
the recomputation; the split branches run none. At a small d_model the step is mostly host work (the ops'
dispatch), which is what a GPU step waits on; at the preset's size the CPU's arithmetic dominates. On the
torch backend the two also differ in the attention call (the split branches take the reference as the custom
op that saves its inputs, the policy the eager reference). Prints one line per mode: the process's CPU
milliseconds per step (the modes alternate, one step each per round, after a warm-up step) and the bytes the
step keeps for its backward (storages alive after the forward: bench/kept.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cmath_mer.bench import model_batch
from cmath_mer.bench.kept import KeptStorages
from cmath_mer.model import cma_transformer
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset

_PLAIN = cma_transformer.CMABlock.forward


def _forced(mode: str):
    """CMABlock.forward with every recomputed block in `mode`."""
    def forward(self, h, aux, cu_seqlens, recompute=False, max_seqlen=None):
        return _PLAIN(self, h, aux, cu_seqlens, mode if recompute else False, max_seqlen)
    return forward


def _kept_bytes(model, batch) -> int:
    produced = KeptStorages()
    with produced:
        loss = model(batch, seed=0).loss
    kept = produced.kept_bytes()
    loss.backward()
    return kept


def _step(model, batch, seed: int) -> float:
    """CPU seconds of this process for one forward and backward (less disturbed than wall time on a shared
    machine)."""
    model.zero_grad(set_to_none=True)
    t0 = time.process_time()
    model(batch, seed=seed).loss.backward()
    return time.process_time() - t0


def _transformer_step(model, batch, seed: int) -> float:
    """CPU seconds of one CMA-Transformer (the first central's) forward and backward on random codes: the
    part the two modes differ in, without the rest of the step."""
    cfg, T = model.config, batch.num_utterances
    gen = torch.Generator().manual_seed(seed)
    h = [torch.randn(T, cfg.d_model, generator=gen, requires_grad=True) for _ in cfg.modalities]
    cma = model.cma[cfg.centrals[0]]
    t0 = time.process_time()
    cma(h[0], h[1:], batch.cu_seqlens, batch.max_seqlen).sum().backward()
    return time.process_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=2048, help="utterances in the batch (recomputed from 2,048 on)")
    p.add_argument("--d-model", type=int, default=32, help="0: the preset's")
    p.add_argument("--rounds", type=int, default=5, help="rounds of one step per mode, the modes alternating")
    args = p.parse_args()
    small = dict(d_model=args.d_model, d_hidden=args.d_model, d_latent=args.d_model // 2) if args.d_model else {}
    cfg = preset("iemocap", backend="torch", recompute_from=args.T, **small)
    lengths = [64] * (args.T // 64) + ([args.T % 64] if args.T % 64 else [])
    batch = model_batch(cfg, lengths, "cpu")
    print(f"T {args.T}, d_model {cfg.d_model}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    modes = ("selective", "split")
    models, times, kept, alone = {}, {m: [] for m in modes}, {}, {m: [] for m in modes}
    try:
        for mode in modes:
            cma_transformer.CMABlock.forward = _forced(mode)
            torch.manual_seed(0)
            models[mode] = CMATH(cfg).train()
            _step(models[mode], batch, 0)                                  # warm-up
            kept[mode] = _kept_bytes(models[mode], batch)
        for r in range(args.rounds):
            for mode in modes:
                cma_transformer.CMABlock.forward = _forced(mode)
                times[mode].append(_step(models[mode], batch, r + 1))
                alone[mode].append(_transformer_step(models[mode], batch, r + 1))
    finally:
        cma_transformer.CMABlock.forward = _PLAIN
    for mode in modes:
        print(f"{mode:9s}  {statistics.median(times[mode]) * 1e3:8.1f} ms CPU/step (median of {args.rounds}; "
              f"min {min(times[mode]) * 1e3:.1f})   kept for the backward {kept[mode] / 2**20:7.1f} MiB   "
              f"one CMA-Transformer alone {statistics.median(alone[mode]) * 1e3:.1f} ms CPU")


if __name__ == "__main__":
    main()
