"""`python -m cmath_mer.bench`: the options of a run (`cmath-mer bench` has the common ones), and the
worker a run starts for each case."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmath_mer.bench.cases import sweep
from cmath_mer.bench.measure import run_case
from cmath_mer.bench.report import write_report
from cmath_mer.bench.run import run_benchmarks


def _worker(quick: bool) -> None:
    case = json.loads(sys.stdin.read())
    row = run_case(case, quick=quick)
    sys.stdout.write("\n" + json.dumps(row, default=str) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cmath_mer.bench", description="Time, throughput and peak "
                                "memory of the three ops and of the whole CMATH step (benchmarks/README.md).")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out")
    p.add_argument("--only", help="run only these ops and/or backends (comma-separated, e.g. "
                   "attention_window,torch)")
    p.add_argument("--long", action="store_true", help="the long-conversation cases (long.py): windowed "
                   "attention and training step at 65,536 to 1,048,576 utterances")
    p.add_argument("--note", help="a line for the report, e.g. what else the machine was running")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier DIR/results.json")
    p.add_argument("--max-n", type=int, help="run only cases with N at most this")
    p.add_argument("--min-n", type=int, help="run only cases with N at least this")
    p.add_argument("--time-budget", type=float, help="per-case time budget in seconds (default 600; 3600 "
                   "with --long)")
    p.add_argument("--report", action="store_true", help="only re-render DIR/results.md and plots from "
                   "DIR/results.json")
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.quick)
        return 0
    if args.report:
        write_report(json.loads((Path(args.out) / "results.json").read_text()), args.out)
        return 0
    if not args.out:
        p.error("--out is required")
    cases = sweep(args.quick, args.device, long=args.long)
    if args.only:                                # ops and/or backends: a case matches every kind named
        names = set(args.only.split(","))
        ops, backends = names & {c["op"] for c in cases}, names & {c["backend"] for c in cases}
        cases = [c for c in cases if (not ops or c["op"] in ops) and (not backends or c["backend"] in backends)]
    if args.max_n:
        cases = [c for c in cases if c["N"] <= args.max_n]
    if args.min_n:
        cases = [c for c in cases if c["N"] >= args.min_n]
    budget = args.time_budget or (3600.0 if args.long else None)
    run_benchmarks(args.out, quick=args.quick, device=args.device, cases=cases, time_budget_s=budget,
                   append=args.append, note=args.note)
    return 0
