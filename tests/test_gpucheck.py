"""The GPU check (python -m cmath_mer.gpucheck): its plan is complete, and its parity and determinism checks
catch what they claim to catch. The stages themselves run on a CUDA machine; here their comparisons run on
CPU tensors under the interpreter."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cmath_mer import gpucheck


def test_dry_run_lists_every_stage_and_each_has_an_implementation():
    p = subprocess.run([sys.executable, "-m", "cmath_mer.gpucheck", "--dry-run"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines() if line and line.split()[0] in gpucheck.STAGE_NAMES]
    assert listed == gpucheck.STAGE_NAMES
    for name in gpucheck.STAGE_NAMES:
        assert callable(getattr(gpucheck, f"stage_{name}")), name


def test_unknown_stage_is_refused():
    p = subprocess.run([sys.executable, "-m", "cmath_mer.gpucheck", "--dry-run", "--stages", "parity,nope"],
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
    assert any(c["op"] == "reconstruction_exact" for c in cases)       # the TF32-bias case of issue 8
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
    name = {"attention": "multi_source_attention", "reconstruction": "reconstruction_loss",
            "variational": "variational_fusion"}[op]
    real = getattr(kernels, name)

    def perturbed(*args, **kwargs):                  # the "fused" side only: 1e-3 relative noise on output 0
        out = real(*args, **kwargs)
        if kwargs.get("backend") != "triton":
            return out
        first = out[0] if isinstance(out, tuple) else out
        noisy = first * (1 + 1e-3 * torch.randn_like(first))
        return (noisy, *out[1:]) if isinstance(out, tuple) else noisy
    monkeypatch.setattr(kernels, name, perturbed)
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
