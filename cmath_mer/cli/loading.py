"""What the commands read once their options are checked: the device (with the ops' backend on it) and the
corpus that --data names, a run's own synthetic corpus included."""
from __future__ import annotations

from pathlib import Path

from cmath_mer.data import DataError, file_format, load_dataset, make_synthetic
from cmath_mer.errors import UsageError
from cmath_mer.kernels.backend import check_backend_usable
from cmath_mer.training.checkpoint import read_metadata
from cmath_mer.training.device import check_device
from cmath_mer.training.run_folder import data_fingerprint


def usable_device(device: str, backend: str | None = None) -> str:
    """The device a command runs on (auto resolved), checked once here with the ops' backend on it
    (CMATH_BACKEND too: refused at start rather than at the first step)."""
    dev = check_device(device, backend)
    check_backend_usable(backend, dev)
    return str(dev)


def loader_options(class_names: tuple[str, ...] | None, data: str | None = None) -> dict:
    if class_names is None:
        return {}
    if data is not None:
        if data == "synthetic" or data.startswith("synthetic:") and not Path(data).exists():
            raise UsageError("--class-names applies to peer pickles; the synthetic corpus has its preset's classes")
        if Path(data).is_file() and file_format(data) == "safetensors":
            raise UsageError(f"--class-names applies to peer pickles; {data} is a safetensors dataset, which "
                             "carries its own class names")
    return {"class_names": class_names}


def load(data: str, preset_name: str, seed: int, class_names: tuple[str, ...] | None = None):
    """The corpus --data names: a dataset file, or the synthetic corpus of `preset_name` built with `seed`."""
    options = loader_options(class_names, data)
    if data == "synthetic":
        return make_synthetic(preset=preset_name, seed=seed)
    return load_dataset(Path(data), **options)


def data_seed(state: dict) -> int:
    """The seed a run's `--data synthetic` corpus was built with: the one its run info records, else (runs
    from before it was recorded) the run's --seed, which a single-seed run builds its corpus with."""
    run = state.get("run") or {}
    if run.get("data_seed") is not None:
        return run["data_seed"]
    return (state.get("train_config") or {}).get("seed", 0)


def load_for_run(data: str, checkpoint: Path, modalities: tuple[str, ...],
                 class_names: tuple[str, ...] | None = None):
    """--data of evaluate and predict. 'synthetic' is the run's own synthetic corpus, rebuilt with the preset
    and seed its training built it with, and checked against the run's data fingerprint."""
    if data != "synthetic":
        return load(data, "iemocap", 0, class_names)
    state = read_metadata(checkpoint / "best.safetensors")["state"]
    run = state.get("run") or {}
    seed = data_seed(state)
    corpus = load(data, run.get("preset") or "iemocap", seed, class_names)
    trained_on = (state.get("data") or {}).get("sha256")
    if trained_on is not None and data_fingerprint(corpus, modalities)["sha256"] != trained_on:
        raise DataError(f"--data synthetic: the synthetic corpus rebuilt with seed {seed} is not the one the run in "
                        f"{checkpoint} trained on (another SHA-256); save the corpus with `cmath-mer synth` and "
                        f"give its file")
    return corpus
