"""--deterministic pins the autotuned configs (kernels/pinned.py): under PyTorch's deterministic mode a launch
runs its key's pinned config (the first the pruning keeps) and never times; otherwise the autotuner times as
before. Runs under the interpreter with a stand-in for the timing (the interpreter cannot time)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from helpers import needs_triton

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def _tuned_kernel(blocks):
    """A +1 kernel autotuned over BLOCK in `blocks`, its pruning keeping blocks <= n (the key), and recording the
    BLOCK it ran with."""
    import triton
    import triton.language as tl

    from cmath_mer.kernels import pinned

    def prune(configs, named_args, **kwargs):
        return [c for c in configs if c.kwargs["BLOCK"] <= named_args["n"]] or configs

    @pinned.autotune([triton.Config({"BLOCK": b}, num_warps=4) for b in blocks], key=["n"],
                     prune_configs_by={"early_config_prune": prune})
    @triton.jit
    def add_one(x, out, used, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.load(x + offs, mask=offs < n) + 1, mask=offs < n)
        tl.store(used, BLOCK)

    def call(n):
        x = torch.randn(n)
        out, used = torch.empty(n), torch.zeros(1, dtype=torch.int32)
        add_one[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, used, n)
        assert torch.equal(out, x + 1)
        return int(used)
    return add_one, call


@needs_triton
def test_deterministic_mode_runs_the_pinned_config_and_never_times(monkeypatch):
    from triton.runtime.autotuner import Autotuner
    timed = []

    def fake_bench(self, *args, config, **kwargs):        # the smallest block "wins" the timing
        timed.append(config.kwargs["BLOCK"])
        return [float(config.kwargs["BLOCK"])] * 3
    monkeypatch.setattr(Autotuner, "_bench", fake_bench)
    blocks = [int(b) for b in torch.tensor([16, 32, 64, 128])[torch.randperm(4)]]
    tuner, call = _tuned_kernel(blocks)
    n = int(torch.randint(40, 200, ()))
    kept = [b for b in blocks if b <= n]
    assert call(n) == 16 and sorted(timed) == sorted(kept)          # timed as before without the mode
    timed.clear()
    with deterministic():
        for m in (n, n + 1, 17):                                    # a key timed before, and new keys
            assert call(m) == [b for b in blocks if b <= m][0]      # the first config the pruning keeps
            assert tuner.best_config.kwargs["BLOCK"] == [b for b in blocks if b <= m][0]
    assert timed == []                                              # the autotuner was never consulted


@needs_triton
def test_every_kernel_autotuner_is_pinned():
    """The attention kernels' autotuners (built on the CPU too) are pinned, and no kernel module builds a bare
    triton.autotune (the reconstruction and variational autotuners exist on a GPU only)."""
    from triton.runtime.autotuner import Autotuner

    from cmath_mer.kernels.attention import fused
    tuners = []
    for value in vars(fused).values():
        while hasattr(value, "fn") and not isinstance(value, Autotuner):
            value = value.fn
        if isinstance(value, Autotuner):
            tuners.append(value)
    assert len(tuners) == 4 and all(getattr(t, "pinned_when_deterministic", False) for t in tuners)
    sources = [p for p in (ROOT / "cmath_mer" / "kernels").rglob("*.py") if p.name != "pinned.py"]
    assert not [p.name for p in sources if "triton.autotune(" in p.read_text()]


@needs_triton
def test_attention_under_deterministic_mode_matches_the_default(nan_poison):
    """The real kernels through the pinned path (heuristics, pruning) give the same numbers."""
    from cmath_mer.kernels.attention import fused
    from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
    lengths = [int(n) for n in torch.randint(1, 80, (3,))]
    T = sum(lengths)
    q, do = torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    k, v = torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)

    def run():
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o = fused.fused_multi_source_attention(qq, kk, vv, cu_seqlens_from(lengths), window=5)
        return (o, *torch.autograd.grad(o, (qq, kk, vv), do))
    want = run()
    with deterministic():
        got = run()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
