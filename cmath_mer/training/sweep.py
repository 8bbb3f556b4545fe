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

from cmath_mer.errors import ConfigError, UsageError
from cmath_mer.files import atomic_write
from cmath_mer.model.config import check_overrides
from cmath_mer.paths import path_component
from cmath_mer.training import multi_run
from cmath_mer.training.config import TrainConfig, train_preset
from cmath_mer.training.prepare import build_config
from cmath_mer.training.seeds import seed_folder, train_seeds

# TrainConfig fields a recipe may not set: the sweep sets them itself (--seeds) or the machine does (torchrun)
SWEEP_SET = {"seed": "--seeds", "world_size": "the number of processes (torchrun)"}


def load_grid(path: str | Path) -> dict[str, dict]:
    """Read and check the grid file's shape (UsageError naming --grid and the file): a non-empty object of
    recipes, each named by a safe folder name, holding only `model` and `train` objects of settable fields."""
    where = f"--grid {path}"
    try:
        grid = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{where}: cannot read the file ({getattr(err, 'strerror', None) or err})") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise UsageError(f"{where}: the JSON is nested too deeply") from None
    if not isinstance(grid, dict) or not grid:
        raise UsageError(f"{where}: a sweep grid is a non-empty JSON object {{name: {{model: ..., train: ...}}}}")
    for name, spec in grid.items():
        path_component(name, f"{where}: recipe name")
        _check_recipe(where, name, spec)
    return grid


def _check_recipe(where: str, name: str, spec) -> None:
    recipe = f"{where}: recipe {name!r}"
    if not isinstance(spec, dict):
        raise UsageError(f"{recipe}: expected an object {{\"model\": {{...}}, \"train\": {{...}}}}, got "
                         f"{type(spec).__name__}")
    unknown = set(spec) - {"model", "train"}
    if unknown:
        raise UsageError(f"{recipe}: unknown key {sorted(unknown)[0]!r} (model, train)")
    for key in ("model", "train"):
        if not isinstance(spec.get(key, {}), dict):
            raise UsageError(f"{recipe}: {key!r} must be an object of fields, got {type(spec[key]).__name__}")
    try:
        check_overrides(spec.get("model", {}), f"{recipe}: model")
    except ConfigError as err:
        raise UsageError(str(err)) from None
    fields = set(TrainConfig.__dataclass_fields__)
    for field in spec.get("train", {}):
        if field in SWEEP_SET:
            raise UsageError(f"{recipe}: train field {field!r} is not set in a grid: it comes from "
                             f"{SWEEP_SET[field]}")
        if field not in fields:
            raise UsageError(f"{recipe}: train field {field!r} is not a field of TrainConfig")


def recipe_configs(data, preset_name: str, modalities, grid: dict[str, dict], where: str = "--grid") -> dict:
    """{name: (CMATHConfig, TrainConfig)} for every recipe, built before any trains: a bad value in any
    recipe is refused (UsageError naming it) before anything is written."""
    built = {}
    for name, spec in grid.items():
        try:
            built[name] = (build_config(data, preset_name, modalities, **spec.get("model", {})),
                           train_preset(preset_name, **spec.get("train", {})))
        except (ConfigError, TypeError) as err:
            raise UsageError(f"{where}: recipe {name!r}: {err}") from None
    return built


def run_sweep(data, preset_name: str, modalities, grid: dict[str, dict], seeds: list[int], out_dir: str | Path,
              *, resume: bool = False, overwrite: bool = False, where: str = "--grid", log=print,
              **train_options) -> dict[str, dict]:
    """Every recipe's seeds into OUT/<name>/ (a multi-run folder, multi_run.py: --resume keeps the finished
    recipes and seeds and continues the interrupted one), the table after each recipe."""
    out = Path(out_dir)
    built = recipe_configs(data, preset_name, modalities, grid, where)
    for seed in seeds:
        seed_folder(out, seed)
    results = {}
    with multi_run.open_folder(out, "sweep", list(grid), resume=resume, overwrite=overwrite):
        for name, (config, tcfg) in built.items():
            log(f"=== recipe {name}")
            folder = out / path_component(name, f"{where}: recipe name")
            results[name] = train_seeds(data, config, tcfg, folder, seeds, log=log,
                                        resume=resume and multi_run.child_begun(folder), **train_options)
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
