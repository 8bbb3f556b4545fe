"""Ahead-of-time compilation of every Triton kernel config for real GPUs, on a machine without one.

    python -m cmath_mer.kernels.aot [--arch 90,80] [--filter SUBSTRING] [--jobs N] [--limit N] [--one-per-kernel]

Each fused module (attention, reconstruction, variational) exposes `aot_specs()`: a list of dicts
    {"name": str, "fn": JITFunction, "signature": {arg: type}, "constexprs": {arg: value},
     "num_warps": int, "num_stages": int}      (optional: "maxnreg": int, "attrs": {arg: [[attr, value]]})
one per (kernel, config) its launchers can run. Every spec is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` for sm_90 and sm_80 (ptxas ships in
the triton wheel), and one row per kernel/config/arch reports registers, spills, shared memory and whether
the sm_90 build uses wgmma. Exit status 1 on any compile failure, spill, or shared memory over the card's
limit (sm_90 227 KiB, sm_80 163 KiB); 2 on a usage error (e.g. kernels already imported in interpreter mode).
"""
from __future__ import annotations

import os
import sys

# The interpreter replaces compilation: it must be off before triton or any kernel module is imported.
_INTERPRET_WAS_SET = os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # the runtime's default; silences a 3.9 warning

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import multiprocessing as mp  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

FUSED_MODULES = ("cmath_mer.kernels.attention.fused", "cmath_mer.kernels.reconstruction.fused",
                 "cmath_mer.kernels.variational.fused")
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}   # max dynamic shared memory per block (opt-in)
ARCHS = (90, 80)

_SPECS: list[dict] | None = None


def _refuse_if_interpreted() -> None:
    """Kernel modules imported earlier in this process under TRITON_INTERPRET=1 hold interpreter functions
    that cannot be compiled."""
    from triton.runtime.interpreter import InterpretedFunction
    for name in FUSED_MODULES:
        mod = sys.modules.get(name)
        for value in vars(mod).values() if mod is not None else ():
            while hasattr(value, "fn") and not isinstance(value, InterpretedFunction):
                value = value.fn
            if isinstance(value, InterpretedFunction):
                sys.exit(f"aot: {name} was imported with TRITON_INTERPRET=1; run `python -m cmath_mer.kernels.aot` "
                         "in a fresh process without TRITON_INTERPRET")


def collect_specs(modules=FUSED_MODULES) -> list[dict]:
    """aot_specs() of every fused module that exists; a module not written yet is skipped."""
    specs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                print(f"# skip {name}: not written yet")
                continue
            raise
        if not hasattr(mod, "aot_specs"):
            print(f"# skip {name}: no aot_specs()")
            continue
        for spec in mod.aot_specs():
            specs.append({**spec, "module": name})
    return specs


def _specs() -> list[dict]:
    global _SPECS
    if _SPECS is None:
        _SPECS = collect_specs()
    return _SPECS


def _attrs(spec: dict) -> dict:
    """Pointer arguments 16-byte aligned, as the runtime specializes them for torch allocations (without it
    ptxas sees scalar loads and the register counts are not the ones the GPU runs). A spec may give its own
    {"attrs": {arg_name: [["tt.divisibility", 16]], ...}} instead."""
    names = spec["fn"].arg_names
    given = spec.get("attrs")
    if given is None:
        given = {a: [["tt.divisibility", 16]] for a, t in spec["signature"].items() if t.startswith("*")}
    return {(names.index(a),): v for a, v in given.items()}


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(index: int, arch: int) -> dict:
    """Compile spec `index` for sm_`arch`; returns the report row (never raises)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    spec = _specs()[index]
    row = {"name": spec["name"], "arch": arch, "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
           "regs": None, "spills": None, "smem": None, "wgmma": None, "error": None}
    log = io.StringIO()
    try:
        src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                        attrs=_attrs(spec))
        with knobs.compilation.scope(), knobs.nvidia.scope():
            knobs.compilation.always_compile = True        # ptxas must run (and log) even on a cache hit
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(log):
                options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
                if spec.get("maxnreg"):
                    options["maxnreg"] = spec["maxnreg"]
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        text = log.getvalue()
        regs, spill = _REGS.search(text), _SPILL.search(text)
        if regs is None or spill is None:
            raise RuntimeError(f"could not read the ptxas log: {text[-300:]!r}")
        row["regs"] = int(regs.group(1))
        row["spills"] = int(spill.group(1)) + int(spill.group(2))
        row["smem"] = int(kernel.metadata.shared)
        row["wgmma"] = "wgmma" in kernel.asm["ptx"]
    except Exception as err:  # noqa: BLE001 - a compile failure is a reported row, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
    return row


def problems(row: dict) -> list[str]:
    out = []
    if row["error"]:
        out.append("COMPILE FAILED: " + row["error"])
    else:
        if row["spills"]:
            out.append(f"SPILLS {row['spills']} B")
        if row["smem"] > SMEM_LIMIT[row["arch"]]:
            out.append(f"SMEM {row['smem']} > {SMEM_LIMIT[row['arch']]}")
    return out


def format_row(row: dict) -> str:
    if row["error"]:
        stats = f"{'-':>5} {'-':>6} {'-':>7} {'-':>5}"
    else:
        stats = (f"{row['regs']:>5} {row['spills']:>6} {row['smem']:>7} "
                 f"{('yes' if row['wgmma'] else 'no') if row['arch'] == 90 else '-':>5}")
    bad = problems(row)
    return (f"{row['name']:<64} sm_{row['arch']} w{row['num_warps']} s{row['num_stages']} {stats}  "
            f"{'; '.join(bad) if bad else 'ok'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cmath_mer.kernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma list of compute capabilities")
    parser.add_argument("--filter", default="", help="only specs whose name contains this substring")
    parser.add_argument("--limit", type=int, default=0, help="at most this many specs (0 = all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--one-per-kernel", action="store_true",
                        help="only the first spec of each kernel function (a quick check of another triton)")
    args = parser.parse_args(argv)

    _refuse_if_interpreted()
    if _INTERPRET_WAS_SET:
        print("# TRITON_INTERPRET was set: unset for ahead-of-time compilation")
    archs = [int(a) for a in args.arch.split(",") if a]
    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        parser.error(f"no shared-memory limit known for sm_{unknown[0]}")
    specs = _specs()
    chosen = [i for i, s in enumerate(specs) if args.filter in s["name"]]
    if args.one_per_kernel:
        seen: set[str] = set()
        chosen = [i for i in chosen if not (specs[i]["fn"].__name__ in seen or seen.add(specs[i]["fn"].__name__))]
    if args.limit:
        chosen = chosen[:args.limit]
    if not chosen:
        print("aot: no kernel specs to compile", file=sys.stderr)
        return 1
    jobs = [(i, a) for i in chosen for a in archs]
    t0 = time.time()
    print(f"{'kernel[config]':<64} arch   cfg  {'regs':>5} {'spills':>6} {'smem':>7} {'wgmma':>5}  status")
    failed = 0
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            # fork: the workers inherit the collected specs (JIT functions do not pickle); pass indices
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")))
            rows = pool.map(compile_one, *zip(*jobs))
        else:
            rows = (compile_one(i, a) for i, a in jobs)
        for row in rows:                                   # in order, as they complete
            print(format_row(row), flush=True)
            failed += bool(problems(row))
    print(f"# {len(jobs)} compiles ({len(chosen)} specs x {len(archs)} archs) in {time.time() - t0:.0f}s: "
          f"{failed} failing")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
