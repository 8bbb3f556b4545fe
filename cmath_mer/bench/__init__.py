"""Benchmark suite: time, throughput and peak memory of the three ops and of the whole CMATH step.

    run_benchmarks(out_dir, quick=False, device="cpu")   # what `cmath-mer bench` calls
    python -m cmath_mer.bench --out DIR [--quick] [--device cpu|cuda]

One module per job:
* cases.py: what a case is (a plain dict: op, backend, mode, batch, N, D, ...), the batches, and `sweep`,
  the registry of every case of a run (the long-conversation cases too).
* build.py, attention.py, calls.py: `build_case`, the inputs of a case and the call to time, per op;
  baselines.py: flex_attention and FlashAttention varlen on our layout (the attention a user would pick
  instead); long.py: builds and summarises the long-conversation cases (windowed attention and training
  step to 1,048,576).
* measure.py: timing and peak memory of one call; `run_case` builds and measures one case in-process.
* run.py: `run_benchmarks`, every case in a fresh subprocess within time and memory budgets.
* machine.py: the machine line (versions, device, load average) and the device's measured ceilings.
* report.py, plots.py: ratios, summary, results.json, results.md, the PNGs.
* cli.py (`python -m cmath_mer.bench`): the options; `cmath-mer bench` calls `run_benchmarks`.

What is measured (docs/KERNELS.md, "Speed targets"; benchmarks/README.md says what a row means):
* ops: multi_source_attention (S = 1 and 2 sources), reconstruction_loss, variational_fusion, forward
  and forward + backward, per backend: `torch` (the eager reference), `torch_compile` (the reference
  under torch.compile), `sdpa_flash` / `sdpa_efficient` / `sdpa_cudnn` / `sdpa_math` (attention only: torch's
  scaled_dot_product_attention on conversations padded to the longest one, with a key padding mask when
  the batch is ragged; inputs are padded before the clock starts, so SDPA is timed as a bare kernel),
  `flex` (attention only: compiled flex_attention with a document mask over the S sources' keys; no
  backward on a CPU), `varlen` (attention only, CUDA: FlashAttention varlen, the keys' per-conversation
  concatenation inside the call) and `triton` (CUDA only: the interpreter on a CPU measures nothing).
* model: one CMATH training step (forward + backward + AdamW step) and inference (eval forward without
  the loss), iemocap preset dimensions, on one conversation of N utterances or a ragged mix; and
  train.py's whole engine step (eager, compiled, and on CUDA replayed from a CUDA graph: `triton_graphs`).
* batches: `equal` = max(1, 2048 // N) conversations of exactly N utterances; `ragged` = conversation
  lengths drawn uniformly from [N/8, N] (the first one is N) until at least max(2048, 2N) utterances;
  `mix16x100` = 16 conversations of 80..120 utterances (an IEMOCAP-like training batch); `meld` / `iemocap` =
  conversations of 4..30 / 40..110 utterances, N utterances in all, in order of length (the model's regime).
* work: FLOP and byte counts from the real (unpadded, in-conversation) pairs only, so padding shows up as
  lost throughput. GFLOP/s and GB/s are reported beside the device's measured ceilings.
"""
from cmath_mer.bench.build import build_case
from cmath_mer.bench.calls import Unavailable, model_batch
from cmath_mer.bench.cases import (
    ATTN_BACKENDS,
    H_HEADS,
    OP_BACKENDS,
    REC_K,
    REC_M,
    VAR_C,
    VAR_Z,
    conversation_lengths,
    make_case,
    series_key,
    sweep,
)
from cmath_mer.bench.cli import main
from cmath_mer.bench.machine import cpu_threads, machine_info, measure_ceilings
from cmath_mer.bench.measure import measure, run_case
from cmath_mer.bench.report import markdown_report, progress_line, summarize, write_report
from cmath_mer.bench.run import run_benchmarks

__all__ = ["ATTN_BACKENDS", "H_HEADS", "OP_BACKENDS", "REC_K", "REC_M", "VAR_C", "VAR_Z", "Unavailable",
           "build_case", "conversation_lengths", "cpu_threads", "machine_info", "main", "make_case",
           "markdown_report", "measure", "measure_ceilings", "model_batch", "progress_line", "run_benchmarks",
           "run_case", "series_key", "summarize", "sweep", "write_report"]
