"""The report of a run: ratios (same run, same shape), ceiling fractions, the summary docs/RESULTS.md quotes,
results.json and results.md (one table per op/shape group); plots.py draws the PNGs."""
from __future__ import annotations

import json
from pathlib import Path

from cmath_mer.bench import long
from cmath_mer.bench.attention import SDPA
from cmath_mer.bench.cases import (
    ATTN_BACKENDS,
    H_HEADS,
    LONG_OPS,
    REC_K,
    REC_M,
    VAR_C,
    VAR_Z,
    WINDOW,
    find_row,
    series_key,
)
from cmath_mer.bench.plots import plot_long, plot_results

BASELINES = SDPA + ("flex", "varlen")           # attention a user would pick instead of ours


def write_report(results: dict, out) -> None:
    """Ratios, ceiling fractions and summary into the results; results.json, results.md and the plots."""
    out = Path(out)
    _add_ratios(results["rows"])
    long.add_doubling_ratios(results["rows"], series_key)
    _add_ceiling_fractions(results)
    results["summary"] = {**summarize(results), **long.summarize(results["rows"])}
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown_report(results))
    plot_results(results, out)
    plot_long(results, out)


def _add_ceiling_fractions(results: dict) -> None:
    """pct_of_peak_flops / pct_of_peak_bw: achieved GFLOP/s and GB/s against the ceilings measured in the
    same run (matmul of the row's dtype; on CUDA fp32 rows are held against the TF32 matmul, the precision
    Triton's fp32 dots use by default)."""
    c = results.get("ceilings", {})
    for r in results["rows"]:
        if r.get("status") != "ok":
            continue
        if r["device"] == "cuda":
            peak = c.get("matmul_tflops_bf16") if r["dtype"] in ("bf16", "fp16") else c.get("matmul_tflops_fp32_tf32")
        else:
            peak = c.get("matmul_tflops_fp32")
        if r.get("gflops_per_s") and peak:
            r["pct_of_peak_flops"] = 100 * r["gflops_per_s"] / (peak * 1e3)
        if r.get("gbytes_per_s") and c.get("copy_gbytes_per_s"):
            r["pct_of_peak_bw"] = 100 * r["gbytes_per_s"] / c["copy_gbytes_per_s"]


def write_json(results, path):
    Path(path).write_text(json.dumps(results, indent=1, default=str) + "\n")


def progress_line(i, n, row) -> str:
    head = (f"[{i + 1}/{n}] {row['op']:<14} {row['backend']:<14} {row['mode']:<6} {row['batch']:<9} "
            f"N={row['N']:<6} D={row['D']} S={row['S']} {row['dtype']}")
    if row.get("status") == "ok":
        return (f"{head}  median {row['median_s'] * 1e3:10.2f} ms  {row['utterances_per_s']:12.0f} utt/s  "
                f"peak {row.get('peak_mem_bytes', 0) / 2**20:8.1f} MiB")
    return f"{head}  {row.get('status')}: {row.get('reason')}"


def _add_ratios(rows: list[dict]) -> None:
    """speedup_vs_torch = median(torch eager) / median(this backend), same shape, same run."""
    ref = {}
    for r in rows:
        if r.get("status") == "ok" and r["backend"] == "torch":
            ref[_shape_key(r)] = r
    for r in rows:
        t = ref.get(_shape_key(r))
        if r.get("status") == "ok" and t:
            r["speedup_vs_torch"] = t["median_s"] / r["median_s"]
            if t.get("peak_mem_bytes") and r.get("peak_mem_bytes") is not None:
                r["mem_vs_torch"] = r["peak_mem_bytes"] / t["peak_mem_bytes"]
    # the whole step: against the eager fp32 reference step of the same batch (the targets' baseline)
    eager32 = {(r["batch"], r["N"]): r for r in rows if r.get("status") == "ok" and r["op"] == "engine_step"
               and r["backend"] == "torch" and r["dtype"] == "fp32"}
    for r in rows:
        t = eager32.get((r["batch"], r["N"])) if r["op"] == "engine_step" else None
        if r.get("status") == "ok" and t:
            r["speedup_vs_eager_fp32"] = t["median_s"] / r["median_s"]


def _shape_key(r) -> tuple:
    return tuple(r[k] for k in ("op", "mode", "batch", "N", "D", "S", "dtype", "device"))


def summarize(results: dict) -> dict:
    """The numbers docs/RESULTS.md quotes."""
    rows = [r for r in results["rows"] if r.get("status") == "ok"]
    s: dict = {}

    def find(**fields):
        return find_row(rows, **fields)
    for b in ("torch", "torch_compile", "triton"):
        r = find(op="train_step", backend=b, batch="mix16x100")
        if r:
            s[f"train_step_{b}_16x100_utt_per_s"] = r["utterances_per_s"]
        for N in (2048, 4096, 8192, 10000, 65536):
            r = find(op="train_step", backend=b, batch="one", N=N)
            if r:
                s[f"train_step_{b}_N{N}_utt_per_s"] = r["utterances_per_s"]
                s[f"train_step_{b}_N{N}_peak_mib"] = r["peak_mem_bytes"] / 2**20
        r = find(op="inference", backend=b, batch="mix16x100")
        if r:
            s[f"inference_{b}_16x100_utt_per_s"] = r["utterances_per_s"]
        r = find(op="inference", backend=b, batch="one", N=10000)
        if r:
            s[f"inference_{b}_N10000_utt_per_s"] = r["utterances_per_s"]
    for r in rows:
        if r["op"] == "engine_step":
            shape = "16x100" if r["batch"] == "mix16x100" else f"N{r['N']}"
            s[f"engine_step_{r['backend']}_{r['dtype']}_{shape}_utt_per_s"] = r["utterances_per_s"]
    a, c = find(op="train_step", backend="torch", batch="one", N=2048), \
        find(op="train_step", backend="torch", batch="one", N=8192)
    if a and c and a.get("peak_mem_bytes"):
        s["train_step_torch_peak_mem_ratio_8192_over_2048"] = c["peak_mem_bytes"] / a["peak_mem_bytes"]
    a, c = find(op="attention", backend="torch", batch="equal", N=2048, S=1, mode="fwdbwd"), \
        find(op="attention", backend="torch", batch="equal", N=8192, S=1, mode="fwdbwd")
    if a and c and a.get("peak_mem_bytes"):
        s["attention_torch_S1_peak_mem_ratio_8192_over_2048"] = c["peak_mem_bytes"] / a["peak_mem_bytes"]
    s.update(_ours_over_baselines(rows))
    return s


def _ours_over_baselines(rows: list[dict]) -> dict:
    """attention_<shape>_<ours>_speedup_over_<baseline> = median(baseline) / median(ours), same shape, same
    run; ours = the eager reference `torch` and, on CUDA, `triton`."""
    ours = {(r["backend"], _shape_key(r)): r for r in rows if r["op"] == "attention" and r["backend"] in
            ("torch", "triton")}
    s = {}
    for r in rows:
        if r["op"] != "attention" or r["backend"] not in BASELINES:
            continue
        for name in ("torch", "triton"):
            o = ours.get((name, _shape_key(r)))
            if o:
                s[f"attention_{r['mode']}_{r['batch']}_S{r['S']}_D{r['D']}_N{r['N']}_{r['dtype']}_{name}_speedup_over_"
                  f"{r['backend']}"] = r["median_s"] / o["median_s"]
    return s


# ------------------------------------------------------------------------------------------- markdown


def _fmt_time(s):
    if s is None:
        return ""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _fmt_mib(b):
    return "" if b is None else f"{b / 2**20:,.1f}"


def _group_key(r) -> tuple:
    return (r["op"], r["mode"], r["batch"], r["D"], r["S"], r["dtype"])


# the title of each op's table; {names} are filled by _group_title
_TITLES = {
    "attention": "multi_source_attention S={S} D={D} H={H}, {mode}, {batch} batch, {dtype}",
    "reconstruction": "reconstruction_loss K={K} M={M}, {mode}, {dtype}",
    "variational": "variational_fusion C={C} Z={Z}, {mode}, {dtype}",
    "train_step": "CMATH training step (fwd + bwd + AdamW), iemocap preset, {batch} batch",
    "engine_step": "train.py's whole step (Stepper: autocast, clip, AdamW, meters), iemocap preset, "
                   "{batch} batch, {dtype}",
    "attention_window": "multi_source_attention S={S} D={D} H={H}, window {W}, {mode}, one conversation, {dtype}",
    "train_window": "CMATH training step, iemocap preset, window {W}, one conversation",
    "train_window_text": "CMATH training step, text only (384-d), meld preset, window {W}, one conversation",
    "inference": "CMATH inference (eval forward), iemocap preset, {batch} batch",
}


def _group_title(op, mode, batch, D, S, dtype) -> str:
    return _TITLES.get(op, _TITLES["inference"]).format(S=S, D=D, H=H_HEADS, K=REC_K, M=REC_M, C=VAR_C, Z=VAR_Z,
                                                        W=WINDOW, mode=mode, batch=batch, dtype=dtype)


def markdown_report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# cmath-mer benchmark — {results['device']}: {m['device_name']}", "",
             f"{results['timestamp']} · {'quick' if results['quick'] else 'full'} sweep · "
             f"{m.get('cpu_cores')} CPU cores, {m.get('torch_threads')} torch threads · python {m['python']} · "
             f"torch {m['torch']} · "
             f"triton {m.get('triton')}" + (f" · CUDA {m['cuda']}" if m.get("cuda") else "") +
             f" · load average at start {' '.join(m.get('loadavg_at_start', []))}, "
             f"at end {' '.join(m.get('loadavg_at_end', []))} · total {results.get('total_s', 0):.0f} s", ""]
    if results.get("note"):
        lines += [f"**Note.** {results['note']}", ""]
    for i, run in enumerate(results.get("sittings", [])):
        rm = run["machine"]
        lines.append(f"- sitting {i + 1}: {run['timestamp']}, load average at start "
                     f"{' '.join(rm.get('loadavg_at_start', []))}, at end {' '.join(rm.get('loadavg_at_end', []))}"
                     + (f", {rm['mem_available_gib_at_start']} GiB of memory available at start"
                        if rm.get("mem_available_gib_at_start") is not None else "")
                     + (f", {run['cases']} cases in {run['total_s']:.0f} s" if run.get("total_s") else ""))
    if results.get("sittings"):
        lines.append("")
    c = results["ceilings"]
    lines += ["Measured ceilings: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                                for k, v in c.items()), ""]
    lines += ["Time: median (p20–p80) per call; utt/s = utterances in the batch / median; peak = peak memory "
              "of the call above what setup allocated (MiB); ×torch = torch-eager median / this median "
              "(>1 is faster), measured in this run. GFLOP/s and GB/s count real (unpadded, in-conversation) "
              "pairs only; (%) = share of this device's ceiling measured in this run. `1×` marks a case timed by "
              "a single call.", ""]
    if results.get("summary"):
        lines += ["## Summary", ""]
        lines += [f"- {k}: {v:,.4g}" for k, v in results["summary"].items()]
        lines.append("")
    groups: dict[tuple, list] = {}
    for r in results["rows"]:
        groups.setdefault(_group_key(r), []).append(r)
    for key, rows in groups.items():
        lines += [f"## {_group_title(*key)}", "",
                  "| N | utterances | backend | median | p20–p80 | utt/s | peak MiB | ×torch | GFLOP/s | GB/s | note |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: (r["N"], ATTN_BACKENDS.index(r["backend"])
                                             if r["backend"] in ATTN_BACKENDS else 9)):
            if r.get("status") != "ok":
                lines.append(f"| {r['N']} | {r.get('utterances', '')} | {r['backend']} | | | | | | | | "
                             f"{r.get('status')}: {str(r.get('reason', '')).replace('|', '/')[:160]} |")
                continue
            note = []
            if r.get("single_call"):
                note.append("1×")
            if r.get("mem_upper_bound"):
                note.append("peak ≤ (setup peaked higher)")
            if r.get("compile_s") is not None:
                note.append(f"{'capture' if r['backend'].endswith('_graphs') else 'compile'} {r['compile_s']:.1f} s")
            if r.get("block_mask_s") is not None:
                note.append(f"BlockMask (once per batch) {_fmt_time(r['block_mask_s'])}")
            if r.get("key_copy_in_call"):
                note.append("key concatenation in the call")
            if r.get("time_ratio_per_doubling"):
                note.append(f"time x{r['time_ratio_per_doubling']:.2f} per doubling of N")
            if r.get("op") in LONG_OPS and r.get("rss_after_setup_bytes") is not None:
                note.append(f"process peak {(r['peak_mem_bytes'] + r['rss_after_setup_bytes']) / 2**30:.2f} GiB")
            cells = [str(r["N"]), str(r["utterances"]), r["backend"], _fmt_time(r["median_s"]),
                     f"{_fmt_time(r['p20_s'])}–{_fmt_time(r['p80_s'])}", f"{r['utterances_per_s']:,.0f}",
                     _fmt_mib(r.get("peak_mem_bytes")),
                     f"{r['speedup_vs_torch']:.2f}" if r.get("speedup_vs_torch") else "",
                     f"{r['gflops_per_s']:.1f} ({r.get('pct_of_peak_flops', 0):.0f}%)" if r.get("gflops_per_s") else "",
                     f"{r['gbytes_per_s']:.1f} ({r.get('pct_of_peak_bw', 0):.0f}%)" if r.get("gbytes_per_s") else "",
                     ", ".join(note)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


