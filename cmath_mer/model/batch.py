"""What the model reads: a batch of packed conversations. Every per-utterance tensor is (T, ...) with
cu_seqlens marking where each conversation starts; no padding anywhere."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    @property
    def num_utterances(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Batch":
        """Copies are non_blocking: asynchronous from pinned memory (the training prefetcher pins)."""
        return Batch({m: x.to(device, non_blocking=True) for m, x in self.features.items()},
                     self.speakers.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.cu_seqlens.to(device, non_blocking=True), self.conversation_ids, self.max_seqlen)
