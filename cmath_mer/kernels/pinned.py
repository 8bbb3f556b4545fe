"""Autotuning that deterministic runs skip: `autotune` is `triton.autotune`, but while PyTorch's deterministic
mode is on (`torch.use_deterministic_algorithms(True)`, which `--deterministic` sets) a launch runs the pinned
config of its key, the first config that the kernel's pruning keeps in the listed order, and never times
anything. Timing picks a config per process; another block size regroups sums (loss and KL partials, the
reconstruction's row partials), so two processes could differ in the last bits. The pinned config is a
function of the key alone (shapes and dtypes), the same in every process.

Imported only by the fused modules (it imports triton).
"""
from __future__ import annotations

import torch
import triton
from triton.runtime.autotuner import Autotuner


def pinned_config(tuner: Autotuner, args: tuple, kwargs: dict) -> triton.Config:
    """The config a deterministic launch runs: the first the tuner's pruning keeps (no timing)."""
    tuner.nargs = dict(zip(tuner.arg_names, args))          # what prune_configs reads, as Autotuner.run sets it
    try:
        return tuner.prune_configs(kwargs)[0]
    finally:
        tuner.nargs = None


def _pin(tuner: Autotuner) -> Autotuner:
    timed_run = tuner.run

    def run(*args, **kwargs):
        if not torch.are_deterministic_algorithms_enabled():
            return timed_run(*args, **kwargs)
        config = pinned_config(tuner, args, kwargs)
        tuner.best_config = config                           # read by the launchers (partials of the config run)
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(tuner.arg_names, args)), **kwargs, **config.all_kwargs()})
        return tuner.fn.run(*args, **kwargs, **config.all_kwargs())

    tuner.run = run
    tuner.pinned_when_deterministic = True
    return tuner


def autotune(configs, key, **kwargs):
    """triton.autotune, pinned under deterministic mode (module docstring)."""
    decorate = triton.autotune(configs, key, **kwargs)
    return lambda fn: _pin(decorate(fn))
