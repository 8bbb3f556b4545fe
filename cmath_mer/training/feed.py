"""Batches to the device: a background thread builds the next steps' batches (pinned memory, non_blocking
copies) while the current step runs, or the whole corpus sits on the device and a batch is gathered there."""
from __future__ import annotations

import queue
import threading

import torch

from cmath_mer.errors import ConfigError
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.batch import Batch

PREFETCH_DEPTH = 2        # batches built ahead of the one the model is working on


class DeviceCorpus:
    """The corpus tensors the model reads, on the device (--data-on-device): a batch is an index_select
    on the device, with only the row indices copied from the host (pinned, non_blocking)."""

    def __init__(self, data, modalities: tuple[str, ...], device: torch.device):
        self.device = device
        need = sum(data.features[m].numel() * data.features[m].element_size() for m in modalities)
        need += data.speakers.numel() * 8 + data.labels.numel() * 8
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if need > free // 2:
                raise ConfigError(f"--data-on-device: the corpus needs {need / 2**20:.0f} MiB, and {device} has "
                                  f"{free / 2**20:.0f} MiB free (at most half of it goes to data); train without "
                                  f"--data-on-device")
        self.features = {m: data.features[m].to(device) for m in modalities}
        self.speakers = data.speakers.to(device)
        self.labels = data.labels.to(device)
        self.bounds = data.cu_seqlens.tolist()
        self.ids = data.conversation_ids

    def batch(self, group: list[int]):
        b = self.bounds
        rows = torch.cat([torch.arange(b[i], b[i + 1]) for i in group])
        lengths = [b[i + 1] - b[i] for i in group]
        cu = cu_seqlens_from(lengths)
        if self.device.type == "cuda":
            rows, cu = rows.pin_memory(), cu.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        return Batch({m: x.index_select(0, rows) for m, x in self.features.items()},
                     self.speakers.index_select(0, rows), self.labels.index_select(0, rows),
                     cu.to(self.device, non_blocking=True), [self.ids[i] for i in group], max(lengths, default=0))


class Prefetcher:
    """Batches for the coming steps are gathered by a background thread while the current step runs
    (pinned memory when the device is CUDA), and copied with non_blocking=True. Iterating yields, per
    optimizer step, the list of its micro-batches, already on the device."""

    def __init__(self, data, plan: list[list[list[int]]], modalities, device: torch.device,
                 on_device: DeviceCorpus | None = None, depth: int = PREFETCH_DEPTH):
        self.data, self.plan, self.modalities, self.device = data, plan, modalities, device
        self.on_device = on_device
        self.pin = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = None

    def __len__(self) -> int:
        return len(self.plan)

    def _host_batch(self, group):
        batch = self.data.batch(group, self.modalities)
        if self.pin:
            batch.features = {m: x.pin_memory() for m, x in batch.features.items()}
            batch.speakers, batch.labels = batch.speakers.pin_memory(), batch.labels.pin_memory()
            batch.cu_seqlens = batch.cu_seqlens.pin_memory()
        return batch

    def _work(self):
        try:
            for step in self.plan:
                item = [self._host_batch(g) for g in step]
                while not self.stop.is_set():
                    try:
                        self.queue.put(("ok", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as err:           # handed to the consumer, raised there
            self.queue.put(("error", err))
            return
        self.queue.put(("done", None))

    def __iter__(self):
        if self.on_device is not None:         # gathering is a device op: no thread needed
            for step in self.plan:
                yield [self.on_device.batch(g) for g in step]
            return
        self.thread = threading.Thread(target=self._work, name="cmath-mer-prefetch", daemon=True)
        self.thread.start()
        try:
            while True:
                kind, item = self.queue.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise item
                yield [b.to(self.device) for b in item]
        finally:
            self.close()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    self.thread.join(timeout=0.05)
            self.thread = None
