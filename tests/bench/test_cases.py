"""The benchmark registry: the rows a user would pick instead of ours are in every GPU run (SDPA cuDNN beside
flash, forward-only rows beside forward + backward, batches of a corpus's conversation lengths)."""
from __future__ import annotations

import random

import pytest

from cmath_mer.bench.attention import unavailable_reason
from cmath_mer.bench.cases import CORPUS_LENGTHS, conversation_lengths, sweep
from cmath_mer.bench.gpucheck.runs import bench_cases


@pytest.mark.parametrize("corpus", sorted(CORPUS_LENGTHS))
def test_corpus_batches_hold_conversations_of_that_corpus_in_order_of_length(corpus):
    N = random.randint(500, 20_000)
    lo, hi = CORPUS_LENGTHS[corpus]
    lengths = conversation_lengths(corpus, N)
    assert N <= sum(lengths) < N + hi
    assert all(lo <= n <= hi for n in lengths) and lengths == sorted(lengths)
    assert conversation_lengths(corpus, N) == lengths          # the same batch in every run


def test_a_gpu_run_has_cudnn_forward_only_and_corpus_rows_for_each_kind_of_attention():
    for cases in (sweep(quick=True, device="cuda"), sweep(quick=False, device="cuda"), bench_cases("cuda")):
        attention = [c for c in cases if c["op"] == "attention"]
        kinds = {(c["backend"], c["mode"], c["batch"]) for c in attention}
        assert ("sdpa_cudnn", "fwdbwd", "equal") in kinds and ("triton", "fwdbwd", "equal") in kinds
        assert {("sdpa_flash", "fwd"), ("sdpa_cudnn", "fwd"), ("triton", "fwd")} <= {(b, m) for b, m, _ in kinds}
        for corpus in CORPUS_LENGTHS:
            for backend in ("sdpa_flash", "sdpa_cudnn", "varlen", "triton"):
                assert (backend, "fwdbwd", corpus) in kinds, (backend, corpus)


def test_cudnn_attention_on_a_cpu_is_unavailable_with_the_reason():
    case = dict(op="attention", backend="sdpa_cudnn", mode="fwdbwd", device="cpu")
    assert "CUDA only" in unavailable_reason(case)
