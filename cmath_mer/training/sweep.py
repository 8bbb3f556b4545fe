"""`cmath-mer sweep`: several recipes x several seeds on one corpus, one table. How the presets' recipes
were chosen (docs/RESULTS.md, docs/experiments/), and how a user tunes on their own data.

The grid is a JSON object {name: {"model": {CMATHConfig overrides}, "train": {TrainConfig overrides}}};
each recipe trains every seed into OUT/<name>/seed-N (seeds.train_seeds). Recipes are compared on the
validation weighted F1 (the epoch and the recipe are chosen on validation, never on test); the table shows
the test numbers beside it, and the context-free baseline on the same features and splits.
"""
from __future__ import annotations

import json
from pathlib import Path

from cmath_mer.files import atomic_write
from cmath_mer.model.config import CMATHConfig
from cmath_mer.training.config import TrainConfig


def load_grid(path: str | Path) -> dict[str, dict]:
    grid = json.loads(Path(path).read_text())
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: a sweep grid is a non-empty JSON object {{name: {{model: ..., train: ...}}}}")
    for name, spec in grid.items():
        unknown = set(spec) - {"model", "train"}
        if unknown:
            raise ValueError(f"{path}: recipe {name!r}: unknown key {sorted(unknown)[0]!r} (model, train)")
        for key, cls in (("model", CMATHConfig), ("train", TrainConfig)):
            fields = set(cls.__dataclass_fields__)
            bad = set(spec.get(key, {})) - fields
            if bad:
                raise ValueError(f"{path}: recipe {name!r}: {key} field {sorted(bad)[0]!r} is not a field of "
                                 f"{cls.__name__}")
    return grid


def run_sweep(data, preset_name: str, modalities, grid: dict[str, dict], seeds: list[int], out_dir: str | Path,
              *, log=print, **train_options) -> dict[str, dict]:
    from cmath_mer.training.config import train_preset
    from cmath_mer.training.seeds import train_seeds
    from cmath_mer.training.train import build_config
    out = Path(out_dir)
    results = {}
    for name, spec in grid.items():
        config = build_config(data, preset_name, modalities, **spec.get("model", {}))
        tcfg = train_preset(preset_name, **spec.get("train", {}))
        log(f"=== recipe {name}")
        results[name] = train_seeds(data, config, tcfg, out / name, seeds, log=log, **train_options)
        write_table(results, grid, out)
    return results


def write_table(results: dict[str, dict], grid: dict[str, dict], out: Path) -> None:
    def pm(s, key):
        v = s.get(key)
        return f"{v['mean']:.2f} ± {v['std']:.2f}" if v else "—"
    rows = ["| recipe | valid wF1 | test wF1 | test acc | baseline test wF1 | gain | seeds below baseline | epoch |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in sorted(results.items(), key=lambda kv: -kv[1].get("valid_weighted_f1", {}).get("mean", 0)):
        below = s.get("gain_over_baseline", {}).get("seeds_below_baseline", "—")
        rows.append(f"| {name} | {pm(s, 'valid_weighted_f1')} | {pm(s, 'test_weighted_f1')} | "
                    f"{pm(s, 'test_accuracy')} | {pm(s, 'baseline_test_weighted_f1')} | "
                    f"{pm(s, 'gain_over_baseline')} | {below} | {pm(s, 'selected_epoch')} |")
    recipes = ["", "Recipes (overrides of the preset):", ""] + [
        f"- `{name}`: {json.dumps(grid[name])}" for name in results]
    n = len(next(iter(results.values()))["seeds"])
    text = (f"Sorted by validation weighted F1 (mean over {n} seeds; epoch and recipe chosen on validation).\n\n"
            + "\n".join(rows + recipes) + "\n")
    atomic_write(out / "sweep.md", lambda tmp: Path(tmp).write_text(text))
    body = json.dumps({"grid": grid, "results": results}, indent=2) + "\n"
    atomic_write(out / "sweep.json", lambda tmp: Path(tmp).write_text(body))
