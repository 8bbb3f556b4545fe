"""The registry: what a benchmark case is, the batches it runs on, and `sweep`, every case of a run.

One *case* is a plain dict (op, backend, mode, batch, N, D, S, dtype, device; the long cases add window).
Cases that differ only in N form a series (one line in a plot), run in ascending N.
"""
from __future__ import annotations

import random

# triton: multi_source_attention with the batch's max_seqlen, as the model calls it (one-pass backward for
# conversations within one tile); triton_multipass: without it (the delta, dq and dk/dv kernels), for comparison
ATTN_BACKENDS = ("torch", "torch_compile", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "varlen",
                 "triton", "triton_multipass")
# the model's real regime: many short conversations of a corpus's lengths, N utterances in all
CORPUS_LENGTHS = {"meld": (4, 30), "iemocap": (40, 110)}
ONEPASS_MAX_N = 128             # triton_multipass differs from triton only where the one-pass backward can run
OP_BACKENDS = ("torch", "torch_compile", "triton")
# their first call compiles (or captures a CUDA graph): run once outside the clock, timed as compile_s
COMPILED_BACKENDS = ("torch_compile", "flex", "triton_compile", "triton_graphs")
H_HEADS = 8                     # attention heads in the op benchmarks (the iemocap model: 8 x 32)
REC_K, REC_M = 256, 1582        # reconstruction: d_hidden -> the audio width of the iemocap preset
VAR_C, VAR_Z = 3, 256           # variational fusion: 3 central modalities, latent width 256


def make_case(op, backend, N, *, mode="fwdbwd", batch="equal", D=32, S=1, dtype="fp32", device="cpu") -> dict:
    return dict(op=op, backend=backend, N=N, mode=mode, batch=batch, D=D, S=S, dtype=dtype, device=device)


def series_key(case: dict) -> tuple:
    """Cases that differ only in N form one series (one line in a plot)."""
    return tuple((k, case[k]) for k in ("op", "backend", "mode", "batch", "D", "S", "dtype", "device"))


def case_id(case: dict) -> tuple:
    return series_key(case) + (case["N"],)


def find_row(rows: list[dict], **fields) -> dict | None:
    """The first row whose fields have these values."""
    return next((r for r in rows if all(r.get(k) == v for k, v in fields.items())), None)


# --------------------------------------------------------------------------------------------- batches


def conversation_lengths(batch: str, N: int, seed: int = 0, min_utterances: int = 2048) -> list[int]:
    """The conversation lengths of a benchmark batch (deterministic in batch, N, seed)."""
    if batch == "equal":
        return [N] * max(1, min_utterances // N)
    if batch == "ragged":
        rng = random.Random(seed * 1_000_003 + N)
        lengths, total, lo = [N], N, max(1, N // 8)
        while total < max(min_utterances, 2 * N):
            n = rng.randint(lo, N)
            lengths.append(n)
            total += n
        return lengths
    if batch in CORPUS_LENGTHS:
        rng, (lo, hi) = random.Random(seed * 1_000_003 + N), CORPUS_LENGTHS[batch]
        lengths = []
        while sum(lengths) < N:
            lengths.append(rng.randint(lo, hi))
        return sorted(lengths)            # batches hold conversations in order of length, as training's do
    if batch == "mix16x100":
        rng = random.Random(seed)
        return [rng.randint(80, 120) for _ in range(16)]
    if batch == "one":
        return [N]
    raise ValueError(f"unknown batch kind {batch!r}")


def case_lengths(case: dict) -> list[int]:
    return conversation_lengths(case["batch"], case["N"], min_utterances=case.get("min_utterances", 2048))


# -------------------------------------------------------------------------------------------- the sweep


def sweep(quick: bool, device: str, long: bool = False) -> list[dict]:
    """The registry: every case of a run, in the order they run (N ascending within a series).
    long: the long-conversation cases of long.py instead (windowed attention and training step,
    65,536 to 1,048,576 utterances)."""
    if long:
        return long_cases(device)
    cases: list[dict] = []
    for dtype in ("fp32", "bf16") if device == "cuda" else ("fp32",):
        for mode in ("fwd", "fwdbwd"):
            cases += _attention_cases(quick, device, dtype, mode)
            if mode == "fwdbwd" or not quick:
                cases += _op_cases(quick, device, dtype, mode)
    return cases + _model_cases(quick, device)


def _attention_cases(quick: bool, device: str, dtype: str, mode: str) -> list[dict]:
    """multi_source_attention against its baselines: torch.compile, SDPA (flash / efficient / cuDNN / math) on
    padded conversations, flex_attention with a document-and-window mask, FlashAttention varlen (CUDA),
    and the Triton kernel (CUDA), on equal and ragged batches and on batches of a corpus's conversation
    lengths (`meld`: 4-30 utterances, `iemocap`: 40-110). Forward-only rows beside forward + backward: on a
    CPU, where flex_attention has no backward, the reference and flex, so flex is measured against ours in
    the same run; on CUDA the kernels a user would pick instead and ours."""
    cuda = device == "cuda"
    backends = ATTN_BACKENDS if cuda else tuple(b for b in ATTN_BACKENDS if not b.startswith("triton"))
    if quick:
        attn_N = {"equal": (256, 2048, 8192), "ragged": (256, 2048), "meld": (2048,)}
        compile_N, Ds = (2048,), (32,)
        math_max_N = 2048          # SDPA math materialises N x S*N scores: 6-12 GiB at 8,192 on a CPU
        if mode == "fwd":
            backends = ("sdpa_flash", "sdpa_cudnn", "flex", "varlen", "triton") if cuda else ("torch", "flex")
    else:
        attn_N = {"equal": (128, 512, 2048, 8192, 32768, 65536, 131072),
                  "ragged": (128, 512, 2048, 8192, 32768, 65536), "meld": (2048, 8192), "iemocap": (2048, 8192)}
        compile_N, Ds, math_max_N = None, (32, 64), None
    if cuda:                   # short conversations (MELD ~10, IEMOCAP ~50-110): the one-pass backward's regime
        attn_N = {**attn_N, "equal": (64, *attn_N["equal"]), "iemocap": attn_N.get("iemocap", (2048,))}
    cases = []
    for S in (1, 2):
        for D in Ds:
            for batch, Ns in attn_N.items():
                for backend in backends:
                    for N in Ns:
                        if backend == "torch_compile" and compile_N is not None and \
                                (N not in compile_N or batch != "equal"):
                            continue
                        if backend == "sdpa_math" and math_max_N is not None and N > math_max_N:
                            continue
                        if backend == "triton_multipass" and N > ONEPASS_MAX_N:
                            continue
                        cases.append(make_case("attention", backend, N, mode=mode, batch=batch, D=D, S=S,
                                               dtype=dtype, device=device))
    return cases


def _op_cases(quick: bool, device: str, dtype: str, mode: str) -> list[dict]:
    """reconstruction_loss and variational_fusion, one 'conversation' of N rows."""
    cuda = device == "cuda"
    lin_N = (1024, 8192, 32768) if quick else (1024, 4096, 16384, 65536, 262144)
    var_N = (1024, 8192, 32768) if quick else (1024, 4096, 16384, 65536, 262144, 1048576)
    cases = []
    for backend in ("torch", "torch_compile", "triton") if cuda else ("torch", "torch_compile"):
        cases += [make_case("reconstruction", backend, N, mode=mode, batch="one", dtype=dtype, device=device)
                  for N in lin_N]
        if quick and backend == "torch_compile" and not cuda:
            continue                   # inductor on CPU did not finish compiling this op in 13 minutes
        cases += [make_case("variational", backend, N, mode=mode, batch="one", dtype=dtype, device=device)
                  for N in var_N]
    cases += [make_case("reconstruction", "chunked", N, mode=mode, batch="one", dtype=dtype, device=device)
              for N in lin_N]                  # row chunks on cuBLAS, beside the Triton kernels
    return cases


def _model_cases(quick: bool, device: str) -> list[dict]:
    """The CMATH training step and inference (iemocap preset), and train.py's whole engine step."""
    cuda = device == "cuda"
    model_backends = ("torch", "torch_compile", "triton") if cuda else ("torch", "torch_compile")
    if quick:
        train = [("mix16x100", 100, b) for b in model_backends if cuda or b == "torch"]
        train += [("one", N, "torch") for N in (2048, 4096, 8192, 10000)]
        if cuda:
            train += [("one", N, "triton") for N in (2048, 8192, 10000, 65536)]
        infer = [("mix16x100", 100, "torch"), ("one", 10000, "torch")]
        if cuda:
            infer += [("mix16x100", 100, "triton"), ("one", 10000, "triton")]
    else:
        train = [("mix16x100", 100, b) for b in model_backends]
        train += [("one", N, b) for b in model_backends for N in (128, 512, 2048, 4096, 8192, 10000, 16384,
                                                                   32768, 65536)]
        train += [("ragged", N, b) for b in model_backends for N in (512, 2048, 8192)]
        infer = [("mix16x100", 100, b) for b in model_backends]
        infer += [("one", N, b) for b in model_backends for N in (2048, 8192, 32768, 65536)]
    cases = [make_case("train_step", backend, N, mode="train", batch=batch, D=32, device=device)
             for batch, N, backend in train]
    cases += [make_case("inference", backend, N, mode="infer", batch=batch, D=32, device=device)
              for batch, N, backend in infer]
    # the whole training step as train.py runs it (Stepper: autocast, loss scaling where fp16, clip,
    # AdamW, device-side meters), eager and compiled, fp32 and bf16; triton on CUDA
    step_backends = (("torch", "torch_compile", "triton", "triton_compile", "triton_graphs") if cuda
                     else ("torch", "torch_compile"))
    for batch, N in (("mix16x100", 100), ("one", 4096)):
        for backend in step_backends:
            for dtype in ("fp32", "bf16"):
                cases.append(make_case("engine_step", backend, N, mode="train", batch=batch, D=32, dtype=dtype,
                                       device=device))
    return cases


# ------------------------------------------------- long conversations (long.py builds and summarises them)

WINDOW = 64
ATTN_N = (65536, 131072, 262144, 524288, 1048576)
BEFORE_N = (65536, 131072)
TRAIN_N = (65536, 131072, 262144)
TEXT_N = (262144, 524288, 1048576)
LONG_OPS = ("attention_window", "train_window", "train_window_text")
TEXT_DIM = 384          # train_window_text: all-MiniLM-L6-v2, the text encoder of `cmath-mer featurize`


def long_cases(device: str) -> list[dict]:
    """The long-conversation cases, in the order they run (N ascending within a series)."""
    cuda = device == "cuda"
    backends = ("torch", "triton") if cuda else ("torch",)
    cases = []
    for backend in backends:
        cases += [make_case("attention_window", backend, N, batch="one", S=2, D=32, device=device) for N in ATTN_N]
    if not cuda:
        cases += [make_case("attention_window", "torch_before", N, batch="one", S=2, D=32, device=device)
                  for N in BEFORE_N]
    for backend in backends:
        cases += [make_case("train_window", backend, N, mode="train", batch="one", device=device) for N in TRAIN_N]
        cases += [make_case("train_window_text", backend, N, mode="train", batch="one", device=device)
                  for N in TEXT_N]
    return [dict(c, window=WINDOW) for c in cases]
