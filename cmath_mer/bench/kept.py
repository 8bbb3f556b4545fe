"""Bytes a forward leaves alive for its backward, counted by storage: every storage an op produces is watched
by weak reference, and those still alive after the forward are what the autograd graph keeps (whatever holds
them: saved variables, checkpoints, hooks). Counts what the tensors hold, not the allocator's slack."""
from __future__ import annotations

import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class KeptStorages(TorchDispatchMode):
    """with KeptStorages() as kept: <forward>; then kept.kept_bytes() while its outputs are alive."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages.setdefault(s.data_ptr(), (StorageWeakRef(s), s.nbytes()))
        return out

    def kept_bytes(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.storages.values() if not ref.expired())
