"""Merge the sweep.json files of several `cmath-mer sweep` runs into one markdown table (docs/experiments/recipe/).

    python tools/merge_sweeps.py OUT.md REFERENCE runs/sweep-a runs/sweep-b ...

A recipe may appear in several sweeps with different seeds (e.g. seeds 0-4 in one, 5-9 in another): its
seeds are pooled. Columns: the validation weighted F1 over every seed the recipe has (what chooses), the
paired validation difference to REFERENCE over the seeds both have (same seed = same validation split, so
the split's difficulty cancels), and over seeds 0-4 only (the five seeds every report uses): test weighted
F1, the gain over the context-free baseline and how many seeds are below it. Sorted by validation.
"""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

REPORTED_SEEDS = (0, 1, 2, 3, 4)


def per_seed(folders) -> dict[str, dict[int, dict]]:
    """recipe -> seed -> {valid, test, gain, epoch}"""
    out: dict[str, dict[int, dict]] = {}
    for folder in folders:
        for name, s in json.loads((Path(folder) / "sweep.json").read_text())["results"].items():
            for i, seed in enumerate(s["seeds"]):
                out.setdefault(name, {})[seed] = {
                    "valid": s["valid_weighted_f1"]["values"][i], "test": s["test_weighted_f1"]["values"][i],
                    "gain": s["gain_over_baseline"]["values"][i], "epoch": s["selected_epoch"]["values"][i]}
    return out


def pm(values) -> str:
    return f"{st.fmean(values):.2f} ± {st.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(runs: dict[str, dict[int, dict]], reference: str) -> str:
    ref = runs[reference]
    rows = [f"| recipe | valid wF1, all seeds (n) | valid − {reference}, paired | test wF1 (seeds 0-4) | "
            "gain over baseline (0-4) | seeds below (0-4) | epoch (0-4) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(runs, key=lambda n: -st.fmean(r["valid"] for r in runs[n].values())):
        seeds = runs[name]
        valid = [r["valid"] for r in seeds.values()]
        common = [s for s in seeds if s in ref]
        diff = pm([seeds[s]["valid"] - ref[s]["valid"] for s in common]) if name != reference else "—"
        five = [seeds[s] for s in REPORTED_SEEDS if s in seeds]
        col = lambda key: pm([r[key] for r in five]) if five else "—"
        below = sum(r["gain"] < 0 for r in five) if five else "—"
        rows.append(f"| {name} | {st.fmean(valid):.2f} ({len(valid)}) | {diff} | {col('test')} | {col('gain')} | "
                    f"{below} | {col('epoch')} |")
    caption = (f"Sorted by validation weighted F1 over every seed a recipe has (seeds pooled across sweeps); the "
               f"paired column is over the seeds shared with {reference}; test numbers over seeds 0-4 only.\n\n")
    return caption + "\n".join(rows) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    text = table(per_seed(sys.argv[3:]), sys.argv[2])
    Path(sys.argv[1]).write_text(text)
    print(text, end="")
