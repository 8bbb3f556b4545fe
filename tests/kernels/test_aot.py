"""Ahead-of-time compilation for sm_90 / sm_80 (python -m cmath_mer.kernels.aot) on a subset of the configs:
ptxas catches what the interpreter cannot (tl.dot shapes, registers, spills, shared memory). The full sweep
runs in CI as its own step (.ci/run)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import needs_triton

ROOT = Path(__file__).resolve().parents[2]


def run_aot(*args: str, interpret: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return subprocess.run([sys.executable, "-m", "cmath_mer.kernels.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if " sm_90 " in line or " sm_80 " in line]


@needs_triton
def test_aot_attention_subset_compiles_for_sm90_and_sm80_without_spills():
    # one dtype / head dim / window setting: every attention kernel and each of its autotune configs
    proc = run_aot("--filter", "fp16,D=64,window=on", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = rows(proc.stdout)
    kernels = {line.split("[")[0] for line in got}
    assert {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkv", "attn_bwd_onepass"} <= kernels, proc.stdout
    assert any(" sm_90 " in r for r in got) and any(" sm_80 " in r for r in got)
    assert all(r.rstrip().endswith("ok") for r in got), proc.stdout
    # the Hopper build of the fp16 attention uses wgmma tensor-core instructions (64-row tiles and up: the
    # one-pass kernel's 16- and 32-row tiles, for short conversations, are below a warpgroup MMA's 64 rows)
    assert all(r.split()[-2] == "yes" for r in got if " sm_90 " in r and "BL=16]" not in r and "BL=32]" not in r), \
        proc.stdout


@needs_triton
def test_aot_unsets_interpreter_and_reports_failures_as_exit_code():
    proc = run_aot("--filter", "attn_bwd_preprocess[fp32,D=16]", "--arch", "80", "--jobs", "1", interpret="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TRITON_INTERPRET was set" in proc.stdout
    assert len(rows(proc.stdout)) == 1
    proc = run_aot("--filter", "no such kernel", "--jobs", "1")
    assert proc.returncode != 0


@needs_triton
def test_aot_refuses_kernels_imported_in_interpreter_mode():
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'; import cmath_mer.kernels.attention.fused; "
            "import cmath_mer.kernels.aot as aot; aot.main(['--limit', '1'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


