"""Helpers for the packed layout: positions within a conversation and conversation boundaries."""
from __future__ import annotations

from typing import Sequence

import torch


def cu_seqlens_from(lengths, dtype: torch.dtype = torch.int32, device=None) -> torch.Tensor:
    """(B+1,) cumulative offsets [0, n_0, n_0 + n_1, ...] of conversations with the given lengths. Host lengths
    (a list or tuple of ints, as the batch builders hold them) are checked: a negative one is an error."""
    if isinstance(lengths, (list, tuple)):
        bad = next((i for i, n in enumerate(lengths) if n < 0), None)
        if bad is not None:
            raise ValueError(f"cu_seqlens: conversation {bad} of the batch has a negative length {lengths[bad]}")
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(device=device, dtype=dtype)


def cu_seqlens_problem(bounds: list[int], total: int) -> tuple[int | None, str] | None:
    """Why host offsets are not the packed layout of `total` rows (at least two, first 0, non-decreasing, last
    `total`), as (the conversation at fault or None, what is wrong); None when they are. The attention kernels
    trust these three facts: rows outside [0, T) or a decreasing pair would be read past the tensors or never
    written."""
    if len(bounds) < 2:
        return None, f"needs B+1 >= 2 offsets, got {len(bounds)}"
    if bounds[0] != 0:
        return 0, f"must start at 0, starts at {bounds[0]}"
    bad = next((i for i in range(len(bounds) - 1) if bounds[i + 1] < bounds[i]), None)
    if bad is not None:
        return bad, f"offsets decrease ({bounds[bad]} then {bounds[bad + 1]})"
    if bounds[-1] != total:
        return len(bounds) - 2, f"must end at T = {total} (the packed rows), ends at {bounds[-1]}"
    return None


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """A clear ValueError for offsets that break the layout (cu_seqlens_problem). Reads the tensor on the host:
    for CPU tensors only (a CUDA tensor would synchronise; those are checked where the batch is built)."""
    problem = cu_seqlens_problem(cu_seqlens.tolist(), total)
    if problem is not None:
        conv, what = problem
        raise ValueError("cu_seqlens" + (f", conversation {conv}" if conv is not None else "") + f": {what}")


def length_bound(max_seqlen: int | None) -> int | None:
    """A power of two >= max_seqlen (at least 16; None stays None): a batch's bound on its conversation lengths
    rounded so that batches of one (utterances, conversations) shape share it (a CUDA graph is captured once per
    shape and bound; the one-pass attention tiles are powers of two from 16, so rounding changes no tile)."""
    if max_seqlen is None:
        return None
    return 1 << max(4, (int(max_seqlen) - 1).bit_length())


def positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64: index of each packed row within its own conversation."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total)
    return torch.arange(total, device=cu_seqlens.device) - starts


def neighbour_masks(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 1) float masks: has_prev[t] = 1 unless t starts a conversation; has_next likewise for ends."""
    has_prev = torch.ones(total, 1, device=cu_seqlens.device)
    has_next = torch.ones(total, 1, device=cu_seqlens.device)
    # index_fill_ takes the 0 as a scalar argument: an indexed assignment of a Python number would copy a
    # CPU tensor to the device, which a CUDA graph capture refuses (seen on an H100)
    has_prev.index_fill_(0, cu_seqlens[:-1].long(), 0.0)
    has_next.index_fill_(0, cu_seqlens[1:].long() - 1, 0.0)
    return has_prev, has_next


def equal_length_runs(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(n, c) for each run of c consecutive conversations of n utterances each. Batches hold conversations
    in order of length, so a few runs cover a batch of short conversations, and each run attends as one SDPA
    batch: one call per conversation spent more time dispatching than computing (MELD's ~10 utterances)."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def key_range(cu_seqlens: torch.Tensor, T: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) int64 each: packed row t attends to the keys lo[t] <= j <= hi[t] of every source: its own
    conversation, within the window."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    start = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=T)
    end = torch.repeat_interleave(cu_seqlens[1:].long(), lengths, output_size=T)
    t = torch.arange(T, device=cu_seqlens.device)
    return torch.maximum(start, t - window), torch.minimum(end - 1, t + window)
