"""Started by torchrun from tests/training/test_distributed.py (not a test module itself).

    ddp_worker.py step OUT      one training step of CMATH in DDP, each rank on its share of one batch (the
                                shares of different utterance counts), sampling off and on; rank 0 saves
                                the parameters after the step and the meter's loss to OUT
    ddp_worker.py cli ARGS...   `cmath-mer ARGS` with {rank} in ARGS replaced by this process's rank (to
                                give one rank a file that the others do not have)
"""
from __future__ import annotations

import os
import sys

import torch

SHARES = [[0, 2, 5], [1, 3]]           # conversations of rank 0 and rank 1; the whole batch is their concatenation
SMALL = dict(d_model=32, n_heads=4, n_layers=1, d_hidden=32, dropout=0.0, input_dropout=0.0)


def corpus():
    from cmath_mer.data import make_synthetic
    data = make_synthetic(None, input_dims={"text": 24, "audio": 20}, num_classes=4, conversations=6,
                          min_length=5, max_length=17, seed=4)
    data.labels[3] = -100                   # an unlabelled utterance: the CE normaliser is not the count
    return data


def one_step(model, forward, batches, first_row):
    """One Stepper step (fp32, SGD, no clipping) of `model` on its micro-batches; returns the meter's read."""
    from cmath_mer.training.meter import StepMeter
    from cmath_mer.training.precision import Precision
    from cmath_mer.training.step import Stepper
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    meter = StepMeter("cpu")
    step = Stepper(model, forward, optimizer, Precision("fp32", "cpu"), 1e9, meter)
    step(batches, 3, 7, first_row)
    return meter.read()


def build(sample: bool):
    from cmath_mer.model.cmath import CMATH
    from cmath_mer.training.prepare import build_config, inverse_frequency_weights
    data = corpus()
    config = build_config(data, "iemocap", **SMALL, variational_sample=sample)
    torch.manual_seed(0)
    model = CMATH(config)
    model.class_weight.copy_(inverse_frequency_weights(data, list(range(len(data)))))
    return data, model


def step(out: str) -> None:
    from cmath_mer.data.batching import rows_before
    from cmath_mer.training import distributed
    distributed.setup("cpu")
    ctx = distributed.context()
    results = {}
    for sample in (False, True):
        data, model = build(sample)
        ddp = torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        seen = one_step(model, ddp, [data.batch(SHARES[ctx.rank])], rows_before(SHARES, data.lengths(), ctx.rank))
        results[sample] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                           "loss": seen["loss_sum"] / seen["utterances"], "utterances": seen["utterances"]}
    if ctx.main:
        torch.save(results, out)
    distributed.teardown()


def cli(args: list[str]) -> int:
    from cmath_mer.cli import main
    rank = os.environ.get("RANK", "0")
    return main([a.replace("{rank}", rank) for a in args])


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step(sys.argv[2])
    else:
        sys.exit(cli(sys.argv[2:]))
