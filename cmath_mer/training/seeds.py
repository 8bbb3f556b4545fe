"""Several seeds of one recipe: `cmath-mer train --seeds 0,1,2,3,4`. Each seed trains into OUT/seed-N (a
run folder of its own, resumable); OUT/summary.json holds mean and standard deviation over the seeds of
every reported number, CMATH beside its context-free baseline. A single best seed is never the result."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from pathlib import Path

from cmath_mer.files import atomic_write
from cmath_mer.paths import path_component
from cmath_mer.training import distributed, multi_run
from cmath_mer.training.train import train

# (name in summary.json, path into metrics.json)
REPORTED = {
    "test_weighted_f1": ("selected_by_validation", "weighted_f1"),
    "test_accuracy": ("selected_by_validation", "accuracy"),
    "valid_weighted_f1": ("selected_by_validation", "valid_weighted_f1"),
    "selected_epoch": ("selected_by_validation", "epoch"),
    "baseline_test_weighted_f1": ("baseline_context_free", "test", "weighted_f1"),
    "baseline_test_accuracy": ("baseline_context_free", "test", "accuracy"),
    "baseline_valid_weighted_f1": ("baseline_context_free", "valid", "weighted_f1"),
    "context_baseline_test_weighted_f1": ("baseline_context_gru", "test", "weighted_f1"),
    "context_baseline_test_accuracy": ("baseline_context_gru", "test", "accuracy"),
    "context_baseline_valid_weighted_f1": ("baseline_context_gru", "valid", "weighted_f1"),
}


def _dig(metrics: dict, path: tuple[str, ...]):
    for key in path:
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics


def summarise(per_seed: dict[int, dict]) -> dict:
    """{name: {mean, std, values}} over seeds for every REPORTED number present in all of them."""
    summary = {"seeds": sorted(per_seed)}
    # how each seed's epoch was chosen: on validation, or (data without validation conversations) training loss
    summary["selected_on"] = " / ".join(sorted({_dig(per_seed[s], ("selected_by_validation", "selected_on"))
                                                or "validation" for s in per_seed}))
    for name, path in REPORTED.items():
        values = [_dig(per_seed[s], path) for s in sorted(per_seed)]
        if any(v is None for v in values):
            continue
        summary[name] = {"mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    if "test_weighted_f1" in summary and "baseline_test_weighted_f1" in summary:
        gains = [a - b for a, b in zip(summary["test_weighted_f1"]["values"],
                                       summary["baseline_test_weighted_f1"]["values"])]
        summary["gain_over_baseline"] = {"mean": statistics.fmean(gains),
                                         "std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                                         "values": gains, "seeds_below_baseline": sum(g < 0 for g in gains)}
    return summary


def seed_folder(out: Path, seed: int) -> Path:
    """OUT/seed-N, where the run of seed N trains."""
    return Path(out) / path_component(f"seed-{seed}", "--seeds: folder")


def train_seeds(data, config, tcfg, out_dir: str | Path, seeds: list[int], *, resume: bool = False,
                overwrite: bool = False, log=print, **train_options) -> dict:
    """Train one run per seed into out_dir/seed-N, then write out_dir/summary.json. Returns the summary.
    out_dir is a multi-run folder (multi_run.py): new or empty, or these runs' to --resume (finished seeds
    kept, the interrupted one continued, the others started) or --overwrite."""
    out = Path(out_dir)
    folders = {seed: seed_folder(out, seed) for seed in seeds}
    main = distributed.context().main                      # under torchrun rank 0 alone writes and logs
    if not main:
        log = lambda *_: None                              # noqa: E731
    with contextlib.ExitStack() as held:
        distributed.on_main(lambda: held.enter_context(multi_run.open_folder(
            out, "seeds", [f.name for f in folders.values()], resume=resume, overwrite=overwrite)))
        per_seed = {}
        for seed, folder in folders.items():
            log(f"--- seed {seed}: {folder}")
            begun = distributed.on_main(lambda: multi_run.child_begun(folder))
            per_seed[seed] = train(data, config, dataclasses.replace(tcfg, seed=seed), folder,
                                   resume=resume and begun, log=log, **train_options)
        summary = summarise(per_seed)
        if main:
            text = json.dumps(summary, indent=2) + "\n"
            atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text))
    log(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    def pm(name):
        s = summary.get(name)
        return f"{s['mean']:.2f} ± {s['std']:.2f}" if s else "n/a"
    n = len(summary["seeds"])
    line = (f"{n} seeds: CMATH test weighted F1 {pm('test_weighted_f1')} "
            f"(selected on {summary.get('selected_on', 'validation')})")
    if "baseline_test_weighted_f1" in summary:
        line += (f"; context-free baseline {pm('baseline_test_weighted_f1')}; gain {pm('gain_over_baseline')}, "
                 f"{summary['gain_over_baseline']['seeds_below_baseline']} seed(s) below the baseline")
    return line
