"""Which preset a `train` without --preset uses: the one the data matches, said in the data line and kept in
the run's info. The synthetic corpus is made from a preset (`synthetic` is iemocap's, `synthetic:NAME`
NAME's); a data file uses the preset whose class set is its own (MELD's seven emotions: meld). Data whose
classes are no preset's are refused in one line that names the choices: a recipe is never picked for data
it was not made for without the user saying so."""
from __future__ import annotations

from pathlib import Path

from cmath_mer.errors import UsageError
from cmath_mer.model.config import PRESETS

DEFAULT_PRESET = "iemocap"


def is_synthetic(data: str) -> bool:
    """--data names the embedded synthetic corpus (a file of that name would be read instead)."""
    return (data == "synthetic" or data.startswith("synthetic:")) and not Path(data).exists()


def _classes(names) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


def describe(name: str) -> str:
    p = {**PRESETS[name]}
    return f"{name} ({p['num_classes']} classes, d={p.get('d_model', 256)})"


def choose_preset(data, given: str | None, data_option: str) -> tuple[str, str]:
    """(preset, why) for a new run on `data` (read from --data `data_option`)."""
    if given is not None:
        return given, "--preset"
    if is_synthetic(data_option):
        name = data_option.partition(":")[2] or DEFAULT_PRESET
        return name, "the synthetic corpus's"
    matches = [n for n, p in PRESETS.items() if _classes(p["class_names"]) == _classes(data.class_names)]
    if len(matches) == 1:
        return matches[0], f"the data's classes are {matches[0]}'s"
    names = ", ".join(data.class_names)
    choices = ", ".join(describe(n) for n in PRESETS)
    raise UsageError(f"--data {data_option}: its classes ({names}) are no preset's; choose the recipe with --preset: "
                     f"{choices}")


def preset_note(run_info: dict | None) -> str:
    """', preset NAME (why)' for a run's data line."""
    run = run_info or {}
    if not run.get("preset"):
        return ""
    return f", preset {run['preset']}" + (f" ({run['preset_why']})" if run.get("preset_why") else "")
