"""The recipe's stability criterion (validation F1 steady after warmup), read from run folders: how much the
validation weighted F1 changes
between consecutive epochs after the warmup epochs.

    python tools/stability.py [--valid-only] RUNS [RUNS ...]

Each RUNS is a recipe folder holding seed-N/metrics.json (what `cmath-mer train --seeds` and each recipe of
`cmath-mer sweep` write), a sweep folder holding such recipe folders, or one run folder. For every seed the
epochs compared are those after the run's `warmup_epochs` (read from its train_config.json, rounded up):
with warmup w, the changes w+1 -> w+2, ..., E-1 -> E (so the change into the first post-warmup epoch, still
a warmup effect, is not counted). Printed per recipe: validation weighted F1 at the selected epoch and test
weighted F1 there (mean ± std over seeds), the gain over the context-free baseline, seeds below it, the
largest |change| over all seeds and which seed and epochs it was, the largest drop, whether the target is met
(largest |change| < 2 on every seed), and, for information, the largest |change| of the step the criterion
does not count (last warmup epoch -> first epoch after it).
"""
from __future__ import annotations

import json
import math
import statistics as st
import sys
from pathlib import Path

TARGET = 2.0


def curve(run: Path) -> tuple[list[float], int]:
    """(validation weighted F1 per epoch, warmup epochs rounded up) of one run folder."""
    metrics = json.loads((run / "metrics.json").read_text())
    tcfg = json.loads((run / "train_config.json").read_text())
    return [row["valid"]["weighted_f1"] for row in metrics["history"]], math.ceil(tcfg.get("warmup_epochs", 0))


def changes(values: list[float], warmup: int) -> list[tuple[int, float]]:
    """(epoch, change from the epoch before) for epochs warmup+2 .. E (1-based), i.e. both epochs after warmup."""
    return [(e + 1, values[e] - values[e - 1]) for e in range(max(warmup + 1, 1), len(values))]


def runs_of(folder: Path) -> dict[str, list[Path]]:
    """recipe name -> its seed run folders, for a run, a recipe folder or a sweep folder."""
    if not folder.is_dir():
        sys.exit(f"{folder}: not a run, recipe or sweep folder")
    if (folder / "metrics.json").is_file():
        return {folder.name: [folder]}
    seeds = sorted(p for p in folder.glob("seed-*") if (p / "metrics.json").is_file())
    if seeds:
        return {folder.name: seeds}
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        out.update(runs_of(sub))
    return out


def summary(name: str, seeds: list[Path]) -> dict:
    worst, drop, per_seed, out_of_warmup = (0.0, None, None), (0.0, None, None), {}, 0.0
    valid, test, gain = [], [], []
    for run in seeds:
        values, warmup = curve(run)
        steps = changes(values, warmup)
        if warmup >= 1 and len(values) > warmup:         # the step not counted: last warmup epoch -> next
            out_of_warmup = max(out_of_warmup, abs(values[warmup] - values[warmup - 1]))
        big = max((abs(d) for _, d in steps), default=0.0)
        per_seed[run.name] = big
        for epoch, d in steps:
            if abs(d) > worst[0]:
                worst = (abs(d), run.name, epoch)
            if d < drop[0]:
                drop = (d, run.name, epoch)
        metrics = json.loads((run / "metrics.json").read_text())
        sel = metrics["selected_by_validation"]
        valid.append(sel["valid_weighted_f1"])
        test.append(sel["weighted_f1"])
        base = metrics.get("baseline_context_free")
        if base:
            gain.append(sel["weighted_f1"] - base["test"]["weighted_f1"])
    return {"recipe": name, "seeds": len(seeds), "valid": valid, "test": test, "gain": gain,
            "largest_change": worst, "largest_drop": drop, "per_seed": per_seed, "out_of_warmup": out_of_warmup}


def pm(values) -> str:
    if not values:
        return "—"
    return f"{st.fmean(values):.2f} ± {st.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def row(s: dict) -> str:
    change, seed, epoch = s["largest_change"]
    drop, dseed, depoch = s["largest_drop"]
    where = f" ({seed}, epoch {epoch - 1}→{epoch})" if seed else ""
    dwhere = f" ({dseed}, {depoch - 1}→{depoch})" if dseed else ""
    below = sum(g < 0 for g in s["gain"])
    met = "yes" if change < TARGET else "no"
    return (f"| {s['recipe']} | {s['seeds']} | {pm(s['valid'])} | {pm(s['test'])} | {pm(s['gain'])} | {below} | "
            f"{change:.2f}{where} | {drop:.2f}{dwhere} | {met} | {s['out_of_warmup']:.2f} |")


def main(argv: list[str]) -> None:
    valid_only = "--valid-only" in argv
    folders = [a for a in argv if a != "--valid-only"]
    if not folders:
        sys.exit(__doc__)
    recipes: dict[str, list[Path]] = {}
    for arg in folders:
        for name, seeds in runs_of(Path(arg)).items():
            recipes.setdefault(name, []).extend(seeds)
    if valid_only:
        print("| recipe | seeds | valid wF1 | largest change | largest drop | < 2 | out of warmup |")
        print("|---|---:|---:|---:|---:|:---:|---:|")
    else:
        print("| recipe | seeds | valid wF1 | test wF1 | gain | seeds below | largest change | largest drop | < 2 | "
              "out of warmup |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|")
    for name, seeds in recipes.items():
        s = summary(name, seeds)
        if valid_only:
            cells = row(s).split(" | ")
            print(" | ".join(cells[:3] + cells[6:]))
        else:
            print(row(s))


if __name__ == "__main__":
    main(sys.argv[1:])
