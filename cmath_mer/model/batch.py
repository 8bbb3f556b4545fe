"""What the model reads: a batch of packed conversations. Every per-utterance tensor is (T, ...) with
cu_seqlens marking where each conversation starts. No padding, except in the batches a CUDA-graphed step
replays (training/graphs.py): there `valid` marks the real rows, and the padding rows, in conversations of
their own, count in no loss term and no metric."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from cmath_mer.errors import DataError
from cmath_mer.kernels.cu_seqlens import cu_seqlens_problem

IGNORE_INDEX = -100                      # the label of an utterance without one (no loss, no metric)


@dataclass
class Batch:
    features: dict[str, torch.Tensor]    # modality -> (T, d_m) float32
    speakers: torch.Tensor               # (T,) int64
    labels: torch.Tensor                 # (T,) int64, IGNORE_INDEX where unlabelled
    cu_seqlens: torch.Tensor             # (B+1,) int32
    conversation_ids: list[str] = field(default_factory=list)
    # a host int >= every conversation's length (None: unknown), set where the batch is packed, where the lengths
    # are host numbers: the attention op takes it for its one-pass backward without reading cu_seqlens
    max_seqlen: int | None = None
    # (T,) bool, the real rows of a padded batch (None: every row is real); padding rows come last
    valid: torch.Tensor | None = None

    def __post_init__(self):
        # built on the host: the offsets are checked here, where reading them costs no device synchronisation
        # (the attention kernels trust them; a batch moved to the GPU is checked before it goes)
        if self.cu_seqlens.device.type == "cpu":
            problem = cu_seqlens_problem(self.cu_seqlens.tolist(), self.labels.shape[0])
            if problem is not None:
                conv, what = problem
                name = "" if conv is None else f"conversation {self._conversation_name(conv)}: "
                raise DataError(f"batch: {name}field 'cu_seqlens': {what}")

    def _conversation_name(self, i: int) -> str:
        return repr(self.conversation_ids[i]) if i < len(self.conversation_ids) else f"{i} of the batch"

    @property
    def num_utterances(self) -> int:
        return self.labels.shape[0]

    @property
    def real_utterances(self) -> int | torch.Tensor:
        """The utterances that count (losses, meters): num_utterances, or for a padded batch the number of its
        real rows, a device tensor (a replayed graph reads it from memory; the host never does)."""
        return self.num_utterances if self.valid is None else self.valid.sum()

    def to(self, device) -> "Batch":
        """Copies are non_blocking: asynchronous from pinned memory (the training prefetcher pins). A shallow copy
        with the tensors moved: the offsets were checked when this batch was built (no second host read)."""
        moved = copy.copy(self)
        moved.features = {m: x.to(device, non_blocking=True) for m, x in self.features.items()}
        moved.speakers, moved.labels, moved.cu_seqlens = (x.to(device, non_blocking=True) for x in
                                                          (self.speakers, self.labels, self.cu_seqlens))
        if self.valid is not None:
            moved.valid = self.valid.to(device, non_blocking=True)
        return moved
