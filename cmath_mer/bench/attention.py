"""The attention cases: inputs and the call to time for ours (`torch`, `torch_compile`, `triton`) and for
the baselines (`sdpa_*` on padded conversations, `flex`, `varlen`; see baselines.py)."""
from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmath_mer.bench import baselines
from cmath_mer.bench.calls import Unavailable, dtype_of, elem_size, fwdbwd, maybe_compile
from cmath_mer.bench.cases import H_HEADS, case_lengths
from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from

SDPA = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math")


def unavailable_reason(case: dict) -> str | None:
    """Why this machine cannot run the attention case, where that is known without running it."""
    backend, cuda = case["backend"], case["device"] == "cuda"
    if backend == "flex" and not cuda and case["mode"] != "fwd":
        return (f"flex: FlexAttention has no backward on CPU (torch {torch.__version__} raises "
                "NotImplementedError); the forward rows measure it")
    if backend == "sdpa_cudnn" and not cuda:
        return "sdpa_cudnn: cuDNN attention (the FA3-class SDPA backend on Hopper) runs on CUDA only"
    if backend == "varlen":
        if not cuda:
            return "varlen: FlashAttention varlen (torch.nn.attention.varlen) runs on CUDA only"
        if baselines.varlen_attn_function() is None:
            return f"varlen: torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    return None


def build_attention(case, dev):
    S, D, H, mode, backend = case["S"], case["D"], H_HEADS, case["mode"], case["backend"]
    why = unavailable_reason(case)
    if why:
        raise Unavailable(why)
    dt = dtype_of(case["dtype"])
    lengths = case_lengths(case)
    T = sum(lengths)
    g = torch.Generator(device="cpu").manual_seed(0)
    grad = mode != "fwd"
    pairs = S * sum(n * n for n in lengths)
    flops = 4 * H * D * pairs * (3.5 if grad else 1.0)       # QK^T and PV; backward = 2.5x forward
    thd = T * H * D * elem_size(case["dtype"])
    nbytes = thd * (2 + 2 * S) + (thd * (4 + 4 * S) if grad else 0)
    info = dict(utterances=T, conversations=len(lengths), pairs=pairs, flops=flops, bytes=nbytes)
    if backend in SDPA:
        return _padded_sdpa(case, dev, lengths, g, dt, info)

    cu = cu_seqlens_from(lengths, device=dev)
    q = torch.randn(T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    if backend not in ("flex", "varlen"):
        return _ours(case, dev, q, cu, g, dt, info, max(lengths))
    k = torch.randn(S, T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    v = torch.randn(S, T, H, D, generator=g).to(dt).to(dev).requires_grad_(grad)
    do = torch.randn(T, H, D, generator=g).to(dt).to(dev) if grad else None
    if backend == "flex":
        t0 = time.perf_counter()
        baselines.document_window_mask(cu, S)                # the first build compiles the builder
        t1 = time.perf_counter()
        block_mask = baselines.document_window_mask(cu, S)   # once per batch, outside the clock
        info["block_mask_compile_s"], info["block_mask_s"] = t1 - t0, time.perf_counter() - t1

        def forward():
            return baselines.flex_multi_source_attention(q, k, v, block_mask)
        return fwdbwd(forward, (q, k, v), mode, do), info
    return _varlen(case, q, k, v, cu, do, lengths, info)


def _ours(case, dev, q, cu, g, dt, info, max_seqlen):
    """multi_source_attention (`torch`, `torch_compile`, `triton`) called as the model calls it: k and v as
    lists of S strided views, source s's k and v the two halves of its own (T, 2 H D) kv projection (strides
    (2 H D, D, 1); MultiSourceAttention in cma_transformer.py), which the Triton op reads in place, and the
    batch's max_seqlen (a host int, as Batch carries it). The gradient flows to the S projections, as in
    training. `triton_multipass`: the Triton op without max_seqlen (the multi-kernel backward)."""
    S, D, H, mode, backend = case["S"], case["D"], H_HEADS, case["mode"], case["backend"]
    T, grad = q.shape[0], mode != "fwd"
    kv = [torch.randn(T, 2 * H * D, generator=g).to(dt).to(dev).requires_grad_(grad) for _ in range(S)]
    do = torch.randn(T, H, D, generator=g).to(dt).to(dev) if grad else None
    impl = "triton" if backend.startswith("triton") else "torch"
    bound = None if backend == "triton_multipass" else max_seqlen
    info["max_seqlen"] = bound

    def attend(q, kv, cu):
        halves = [x.view(T, 2, H, D) for x in kv]                                     # (T, 2, H, D) views
        k, v = [x[:, 0] for x in halves], [x[:, 1] for x in halves]                   # S x (T, H, D) each
        return multi_source_attention(q, k, v, cu, max_seqlen=bound, backend=impl)
    fn = maybe_compile(attend, backend)
    return fwdbwd(lambda: fn(q, kv, cu), (q, *kv), mode, do), info


def _varlen(case, q, k, v, cu, do, lengths, info):
    S = case["S"]
    order = baselines.conversation_major_keys(cu, S) if S > 1 else None
    max_len = max(lengths)
    info["key_copy_in_call"] = S > 1

    def forward():
        return baselines.varlen_multi_source_attention(q, k, v, cu, max_len, key_order=order)
    call = fwdbwd(forward, (q, k, v), case["mode"], do)
    try:                                                 # e.g. fp32: FlashAttention takes fp16/bf16 only
        call()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        raise Unavailable(f"varlen: {str(err).strip().splitlines()[0][:300]}") from None
    return call, info


def _padded_sdpa(case, dev, lengths, g, dt, info):
    """torch's scaled_dot_product_attention on conversations padded to the longest one, with a key
    padding mask when the batch is ragged; the padding happens here, before the clock starts."""
    S, D, H, mode, backend = case["S"], case["D"], H_HEADS, case["mode"], case["backend"]
    grad = mode != "fwd"
    kind = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}[backend]
    B, L = len(lengths), max(lengths)
    info["padded_pairs"] = S * B * L * L
    q = torch.zeros(B, H, L, D, dtype=dt)
    k = torch.zeros(B, H, S * L, D, dtype=dt)
    v = torch.zeros(B, H, S * L, D, dtype=dt)
    mask = None
    if len(set(lengths)) > 1:                            # key padding mask, broadcast over queries
        mask = torch.zeros(B, 1, 1, S * L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        q[b, :, :n] = torch.randn(H, n, D, generator=g).to(dt)
        for s in range(S):
            k[b, :, s * L:s * L + n] = torch.randn(H, n, D, generator=g).to(dt)
            v[b, :, s * L:s * L + n] = torch.randn(H, n, D, generator=g).to(dt)
            if mask is not None:
                mask[b, :, :, s * L:s * L + n] = True
    q, k, v = (t.to(dev).requires_grad_(grad) for t in (q, k, v))
    mask = mask.to(dev) if mask is not None else None
    do = torch.randn(q.shape, generator=g).to(dt).to(dev) if grad else None

    def forward():
        with sdpa_kernel([kind]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    call = fwdbwd(forward, (q, k, v), mode, do)
    try:                                                 # "No available kernel" -> Unavailable
        call()
    except RuntimeError as err:
        raise Unavailable(f"{backend}: {str(err).strip().splitlines()[0][:300]}") from None
    return call, info
