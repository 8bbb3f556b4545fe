"""`--cuda-graphs`: the training step captured in a CUDA graph once per batch shape, then replayed.

Why. On an H100 the eager step is bound by the host: a 16 x ~100-utterance step issues ~2,000 kernel
launches and spends 16 ms of GPU time in 175 ms of wall time (profile, benchmarks/results/2026-11-26-h100);
the same step replayed from a CUDA graph took 7.6 ms against 87.5 ms eager, bitwise equal.

How (PyTorch's whole-network capture, once per (utterances, conversations) shape):
- The first step of a shape runs eagerly, on a side stream (a real, counted step: autotuning, the caching
  allocator and AdamW's state happen there), then the same step is captured on static copies of that batch.
  Every later step of that shape copies its batch into the static buffers and replays the graph. Batches
  group conversations sorted by length, so the shapes of the first epoch recur in every later one.
- Whatever changes between replays is read from device memory: the batch buffers, the variational seed
  (the kernels load it), the learning rate (a tensor in fused, capturable AdamW). Dropout draws new numbers
  on every replay (PyTorch's generator is graph-safe), so a run is as random as an eager one, not equal to it.
- All graphs share one memory pool: nothing allocated inside a capture outlives its replay (gradients,
  optimizer state and meters exist before the first capture), so one graph may reuse another's memory. The
  static batches' features are views of one buffer per modality (SharedFeatures): about one batch of
  features on the GPU, however many shapes are captured.

When (train.resolve_cuda_graphs: a run that does not choose takes CUDA graphs wherever these hold): a CUDA
device, the Triton ops (the reference attention reads cu_seqlens on the host), bf16 or fp32 with TF32 (fp16's
loss scaler reads its inf flag on the host), no gradient accumulation, no torch.compile, one process.
"""
from __future__ import annotations

import torch

from cmath_mer.kernels.cu_seqlens import length_bound


def batch_shape(batch) -> tuple:
    """What a captured graph is specialised to: every tensor's shape (T utterances, B conversations) and the
    bound on the conversation lengths, rounded (packing.length_bound): the attention backward picks its kernels
    from the bound on the host, so a graph replays only for batches within the bound it was captured with."""
    return (batch.num_utterances, batch.cu_seqlens.numel(),
            tuple((m, tuple(x.shape), x.dtype) for m, x in sorted(batch.features.items())),
            length_bound(batch.max_seqlen))


class SharedFeatures:
    """One buffer per modality that the static batches of all graphs view: a replay's features sit in its first
    T rows. Steps run one after another on one stream, so one buffer serves every batch shape, and the static
    inputs of a run hold about one batch, not one copy per captured shape (a corpus whose batches all differ
    in size would otherwise sit on the GPU once more, in pieces). A batch longer than the buffer gets a new one
    of at least 1.5x the rows; graphs captured before keep the old one alive through their views, so all the
    buffers together stay under 3x the last one, itself under 1.5x the longest batch (a bucketed epoch's
    batches are about `batch_utterances` each: one or two buffers)."""

    GROWTH = 1.5

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def view(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers.get(modality)
        same_kind = (buf is not None and buf.shape[1:] == x.shape[1:] and buf.dtype == x.dtype
                     and buf.device == x.device)
        if not same_kind or buf.shape[0] < x.shape[0]:
            rows = max(x.shape[0], int(buf.shape[0] * self.GROWTH)) if same_kind else x.shape[0]
            buf = self.buffers[modality] = x.new_empty((rows, *x.shape[1:]))
        return buf[:x.shape[0]]


def static_copy(batch, shared: SharedFeatures):
    """Buffers a graph reads its batch from, filled with this batch: the features as views of the shared
    buffers, the rest (a few ints per utterance) its own; its bound is the rounded one, true for every batch of
    the shape."""
    from cmath_mer.model.batch import Batch
    features = {}
    for m, x in batch.features.items():
        features[m] = shared.view(m, x)
        features[m].copy_(x)
    return Batch(features, batch.speakers.clone(), batch.labels.clone(), batch.cu_seqlens.clone(),
                 list(batch.conversation_ids), length_bound(batch.max_seqlen))


def fill(static, batch) -> None:
    for m, x in batch.features.items():
        static.features[m].copy_(x, non_blocking=True)
    static.speakers.copy_(batch.speakers, non_blocking=True)
    static.labels.copy_(batch.labels, non_blocking=True)
    static.cu_seqlens.copy_(batch.cu_seqlens, non_blocking=True)


class CudaGraphs:
    """The CUDA side: an eager run on a side stream (the capture recipe's warm-up) and a capture into a
    graph that shares the stepper's memory pool. Tests on the CPU pass a stand-in with the same methods."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, fn) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        # thread_local: Prefetcher's thread pins the next batches (a pinned host allocation, event
        # queries) while this thread captures, and in the default "global" mode such a call from any thread
        # during a capture invalidates it; the capture's own thread is still checked
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Fused, capturable AdamW with its learning rate in a device tensor and its step counters on the device
    (also after a checkpoint of an eager run was loaded into it)."""
    for group in optimizer.param_groups:
        group["fused"], group["capturable"], group["foreach"] = True, True, None
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)
