"""How a step's batch is split: into micro-batches (--accumulate) and into one share per rank of a distributed
run (the distributed bucketed sampler), and whole evaluation batches for sharded evaluation. One splitter,
split_by_utterances, does both cuts. Pure functions of lengths and seeds: every
rank computes the same plan, and nothing is communicated.

Training: the steps are the single-process run's length-bucketed batches (ConversationDataset.
bucketed_batches, `utterances_per_step` utterances each), so the effective batch does not depend on the
number of processes; each step's conversations are cut into consecutive runs of about equal utterance
counts, one per rank (the work is per utterance), never cutting a conversation. A step with fewer
conversations than ranks joins the next one, so no rank ever gets an empty batch and no conversation is
dropped.
"""
from __future__ import annotations

import bisect

from ..errors import ConfigError


def split_by_utterances(group: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Cut `group` into `parts` consecutive runs (micro-batches, or one per rank) of about equal utterance
    counts (the work is per utterance); a group of fewer conversations than `parts` gives one run per
    conversation. Consecutive, so the shares in rank order ARE the single-process batch: rank r's rows start
    at rows_before(...) in it and draw the variational eps one process draws for them (a dealing that
    reorders the conversations would give 2 processes other noise than 1). The counts differ by at most the
    longest conversation of the group: the cuts nearest to the equal shares usually do; when they do not,
    a search over the smallest share finds cuts that do. With len(group) >= parts no run is empty."""
    parts = max(1, min(parts, len(group)))
    sizes = [lengths[c] for c in group]
    prefix = [0]
    for n in sizes:
        prefix.append(prefix[-1] + n)
    cuts = _nearest_cuts(prefix, parts)
    if _spread(prefix, cuts) > max(sizes, default=0):
        cuts = _cuts_within(prefix, parts, max(sizes)) or cuts
    return [group[a:b] for a, b in zip(cuts, cuts[1:])]


def _spread(prefix: list[int], cuts: list[int]) -> int:
    counts = [prefix[b] - prefix[a] for a, b in zip(cuts, cuts[1:])]
    return max(counts) - min(counts)


def _nearest_cuts(prefix: list[int], parts: int) -> list[int]:
    """cuts[i]: the conversation boundary whose utterance count is nearest to i/parts of the whole, kept
    strictly increasing with room for the runs after it (no empty run)."""
    n, total = len(prefix) - 1, prefix[-1]
    cuts = [0]
    for i in range(1, parts):
        lo, hi = cuts[-1] + 1, n - (parts - i)
        j = bisect.bisect_left(prefix, total * i / parts, lo, hi + 1)
        if j > lo and (j > hi or total * i / parts - prefix[j - 1] <= prefix[j] - total * i / parts):
            j -= 1
        cuts.append(min(j, hi))
    return cuts + [n]


def _cuts_within(prefix: list[int], parts: int, width: int) -> list[int] | None:
    """Cuts whose runs all hold between `low` and `low + width` utterances, for the largest `low` (at most an
    equal share) for which they exist; None if there are none. If the counts differ by at most `width`, the
    smallest lies within `width` below an equal share: those are the only `low` to try."""
    n, total = len(prefix) - 1, prefix[-1]
    for low in range(total // parts, max(1, -(-total // parts) - width) - 1, -1):
        # reach[p][j]: the previous cut when the first j conversations make p runs within the bounds
        reach = [{0: None}]
        for p in range(1, parts + 1):
            ends = sorted(reach[-1])
            at = [prefix[e] for e in ends]
            step = {}
            for j in range(p, n + 1):
                k = bisect.bisect_left(at, prefix[j] - low - width)
                if k < len(ends) and prefix[ends[k]] <= prefix[j] - low and ends[k] < j:
                    step[j] = ends[k]
            reach.append(step)
        if n in reach[parts]:
            cuts, j = [n], n
            for p in range(parts, 0, -1):
                j = reach[p][j]
                cuts.append(j)
            return cuts[::-1]
    return None


def rank_batches(groups: list[list[int]], lengths: list[int], world_size: int) -> list[list[list[int]]]:
    """steps[s][r]: the conversations rank r trains on at step s, from the single-process steps `groups`.
    A group with fewer conversations than ranks is joined to the next one (the last to the previous)."""
    steps, pending = [], []
    for group in groups:
        pending = pending + list(group)
        if len(pending) >= world_size:
            steps.append(pending)
            pending = []
    if pending:
        if not steps:
            raise ConfigError(f"{world_size} processes and {len(pending)} training conversation(s): every process "
                              f"needs at least one conversation per step (a conversation is never cut); start at "
                              f"most {len(pending)} processes")
        steps[-1] = steps[-1] + pending
    return [split_by_utterances(step, lengths, world_size) for step in steps]


def rows_before(shares: list[list[int]], lengths: list[int], rank: int) -> int:
    """Utterances of the step's whole batch (ranks in order) before `rank`'s share: where its rows start."""
    return sum(lengths[c] for share in shares[:rank] for c in share)


def eval_shards(batches: list[list[int]], lengths: list[int], world_size: int) -> list[list[list[int]]]:
    """Whole evaluation batches per rank, balanced by utterances (longest first, to the least loaded). A batch
    is evaluated exactly as one process evaluates it, so the gathered predictions, and the metrics, are
    the single-process ones bit for bit. A rank may get none (fewer batches than ranks)."""
    loads = [0] * world_size
    shards: list[list[list[int]]] = [[] for _ in range(world_size)]
    for b in sorted(range(len(batches)), key=lambda b: (-sum(lengths[c] for c in batches[b]), b)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(batches[b])
        loads[rank] += sum(lengths[c] for c in batches[b])
    return shards
