"""Which conversations each rank of a distributed run works on: the distributed bucketed sampler for
training, and whole evaluation batches for sharded evaluation. Pure functions of lengths and seeds: every
rank computes the same plan, and nothing is communicated.

Training: the steps are the single-process run's length-bucketed batches (ConversationDataset.
bucketed_batches, `utterances_per_step` utterances each), so the effective batch does not depend on the
number of processes; each step's conversations are dealt to the ranks by utterance count (the work is per
utterance), never cutting a conversation. A step with fewer conversations than ranks joins the next one, so no
rank ever gets an empty batch and no conversation is dropped.
"""
from __future__ import annotations

from ..errors import ConfigError


def split_by_utterances(group: list[int], lengths: list[int], parts: int) -> list[list[int]]:
    """Deal the conversations of `group` to `parts` ranks: longest first, each to the rank with the fewest
    utterances so far (list scheduling, LPT). When a rank last received a conversation it had the fewest, so
    the ranks' counts differ by at most the longest conversation. Each part keeps the group's order; with
    len(group) >= parts no part is empty (every conversation has at least one utterance)."""
    loads = [0] * parts
    owner = {}
    for pos in sorted(range(len(group)), key=lambda p: (-lengths[group[p]], p)):
        rank = min(range(parts), key=lambda r: (loads[r], r))
        owner[pos] = rank
        loads[rank] += lengths[group[pos]]
    return [[c for pos, c in enumerate(group) if owner[pos] == r] for r in range(parts)]


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
