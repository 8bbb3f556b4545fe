"""Long conversations: windowed attention and the windowed CMATH training step, 65,536 to 1,048,576 utterances.

    python -m cmath_mer.bench --long --out DIR [--device cpu|cuda]

Cases (registered in cases.sweep(..., long=True); each runs in its own process like every other case):
* `attention_window`: multi_source_attention fwd + bwd, one conversation, S = 2, H = 8, D = 32, window 64,
  N = 65,536 .. 1,048,576; backends `torch` (the banded reference) and, on CUDA, `triton`. On the CPU also
  `torch_before` at 65,536 and 131,072: the windowed reference as it was before (SDPA per 256-query block),
  to measure the speed-up in the same run.
* `train_window`: one CMATH training step (forward + backward + AdamW), iemocap preset, window 64, one
  conversation of N = 65,536 .. 262,144 utterances with the iemocap widths (text 1,024, audio 1,582, visual 342).
* `train_window_text`: the step on text alone, as a transcript gives it: 384-d all-MiniLM-L6-v2 features (what
  `cmath-mer featurize` writes) and the meld preset (d 128, 4 heads, 2 CMA blocks, pointwise step 1), window
  64, N = 262,144 .. 1,048,576.

Windowed work is O(N * window), so each doubling of N should cost 2x the time and memory: the report gives
`time_ratio_per_doubling` (this N's median / the previous N's, per doubling) and a plot against a
linear reference line (plots.plot_long).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmath_mer.bench.calls import dtype_of, elem_size, fwdbwd, model_batch, training_step
from cmath_mer.bench.cases import BEFORE_N, H_HEADS, LONG_OPS, TEXT_DIM, find_row
from cmath_mer.kernels import multi_source_attention
from cmath_mer.kernels.cu_seqlens import cu_seqlens_from
from cmath_mer.model.cmath import CMATH
from cmath_mer.model.config import preset


def blocked_reference_before(q, k, v, cu_seqlens, *, window=None, scale=None, query_block=256):
    """The windowed reference as it was before the banded one: per conversation, queries in blocks of 256,
    SDPA over each block's key range with a band mask. Its backward is quadratic in the conversation
    length (each slice of k and v gets a full-size gradient that is then summed); kept as a second
    definition for the tests and as the 'before' of the benchmark."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S, _, H, D = k.shape

    def attend(q, k, v, mask=None):
        m = k.shape[1]
        kh = k.permute(2, 0, 1, 3).reshape(1, H, S * m, D)
        vh = v.permute(2, 0, 1, 3).reshape(1, H, S * m, D)
        mask = None if mask is None else mask.repeat(1, S)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), kh, vh, attn_mask=mask, scale=scale)
        return o.squeeze(0).transpose(0, 1)

    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        if window is None or window >= n - 1:
            out.append(attend(q[start:end], k[:, start:end], v[:, start:end]))
            continue
        for i0 in range(0, n, query_block):
            i1 = min(n, i0 + query_block)
            j0, j1 = max(0, i0 - window), min(n, i1 + window)
            mask = (torch.arange(i0, i1, device=q.device)[:, None]
                    - torch.arange(j0, j1, device=q.device)[None, :]).abs() <= window
            out.append(attend(q[start + i0:start + i1], k[:, start + j0:start + j1], v[:, start + j0:start + j1],
                              mask))
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------- building


def build(case: dict, dev: torch.device):
    """(call, info) for a long case."""
    if case["op"] == "attention_window":
        return _build_attention(case, dev)
    return _build_train(case, dev)


def _build_attention(case, dev):
    S, D, H, N, w = case["S"], case["D"], H_HEADS, case["N"], case["window"]
    dt = dtype_of(case["dtype"])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, H, D, generator=g).to(dt).to(dev).requires_grad_()
    k = torch.randn(S, N, H, D, generator=g).to(dt).to(dev).requires_grad_()
    v = torch.randn(S, N, H, D, generator=g).to(dt).to(dev).requires_grad_()
    do = torch.randn(N, H, D, generator=g).to(dt).to(dev)
    cu = cu_seqlens_from([N], device=dev)
    pairs = S * (N * (2 * w + 1) - w * (w + 1)) if N > w else S * N * N      # |i - j| <= w within N
    e = elem_size(case["dtype"])
    info = dict(utterances=N, conversations=1, pairs=pairs, flops=4 * H * D * pairs * 3.5,
                bytes=N * H * D * e * (6 + 6 * S), window=w)
    if case["backend"] == "torch_before":
        def forward():
            return blocked_reference_before(q, k, v, cu, window=w)
    else:
        impl = "triton" if case["backend"] == "triton" else "torch"

        def forward():
            return multi_source_attention(q, k, v, cu, window=w, backend=impl)
    return fwdbwd(forward, (q, k, v), "fwdbwd", do), info


def _build_train(case, dev):
    impl = "triton" if case["backend"] == "triton" else "torch"
    if case["op"] == "train_window_text":
        # text alone is what a transcript gives: the 384-d all-MiniLM-L6-v2 features `cmath-mer featurize`
        # writes, and the preset chosen for text-led data (meld: d 128, 2 CMA blocks, pointwise step 1)
        cfg = preset("meld", backend=impl, window=case["window"], modalities=("text",),
                     input_dims={"text": TEXT_DIM})
    else:
        cfg = preset("iemocap", backend=impl, window=case["window"])
    torch.manual_seed(0)
    model = CMATH(cfg).to(dev).train()
    batch = model_batch(cfg, [case["N"]], dev)
    info = dict(utterances=case["N"], conversations=1, flops=0, bytes=0, window=case["window"],
                modalities=",".join(cfg.modalities), recompute_from=cfg.recompute_from)
    return training_step(model, cfg, batch, dev), info


# --------------------------------------------------------------------------------------------- report


def add_doubling_ratios(rows: list[dict], series_key) -> None:
    """time_ratio_per_doubling = (median(N) / median(N_prev)) ** (1 / log2(N / N_prev)) within a series;
    2.0 is linear, 4.0 quadratic. The same for the peak memory."""
    last: dict = {}
    for r in sorted((r for r in rows if r.get("op") in LONG_OPS and r.get("status") == "ok"), key=lambda r: r["N"]):
        key = series_key(r)
        p = last.get(key)
        if p:
            doublings = math.log2(r["N"] / p["N"])
            r["time_ratio_per_doubling"] = (r["median_s"] / p["median_s"]) ** (1 / doublings)
            if r.get("peak_mem_bytes") and p.get("peak_mem_bytes"):
                r["mem_ratio_per_doubling"] = (r["peak_mem_bytes"] / p["peak_mem_bytes"]) ** (1 / doublings)
        last[key] = r


def summarize(rows: list[dict]) -> dict:
    """The numbers docs/RESULTS.md quotes."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("op") in LONG_OPS]
    s: dict = {}

    def find(**fields):
        return find_row(ok, **fields)
    for backend in ("torch", "triton"):
        a, b = find(op="attention_window", backend=backend, N=65536), find(op="attention_window", backend=backend,
                                                                          N=262144)
        if a and b:
            s[f"attention_window_{backend}_time_ratio_262144_over_65536"] = b["median_s"] / a["median_s"]
        for r in ok:
            if r["backend"] == backend:
                s[f"{r['op']}_{backend}_N{r['N']}_s"] = r["median_s"]
                if r.get("peak_mem_bytes") is not None:
                    total = r["peak_mem_bytes"] + r.get("rss_after_setup_bytes", 0)
                    s[f"{r['op']}_{backend}_N{r['N']}_peak_process_gib"] = total / 2**30
    for N in BEFORE_N:
        a, b = find(op="attention_window", backend="torch_before", N=N), find(op="attention_window",
                                                                              backend="torch", N=N)
        if a and b:
            s[f"attention_window_speedup_over_before_N{N}"] = a["median_s"] / b["median_s"]
    return s
