#!/usr/bin/env bash
# The GPU check in one call on a CUDA machine with limited time: the stages in priority order inside a time
# budget, with the machine's own torch and triton (nothing installed), results packed into $OUT/gpucheck.tgz
# ($OUT: a folder the caller collects; /tmp when unset). Usage, from the repository root on the GPU machine:
#   tools/gpu_session.sh [BUDGET_SECONDS] [STAGES]
# Order: the fault checks first (kernels changed since the last GPU run have never run on a GPU): parity,
# autotune_cold, determinism, and the CUDA-graph step and training path; then the speed targets and the rest.
# The default budget, 8 minutes, fits a 9-minute lease with the start and the packing. A second call with
# the stages the summary lists as not finished (TIMEOUT or SKIPPED; the last line printed is that call)
# finishes the check. Results:
# benchmarks/results/<date>-<card>-<time>/ (commit them as <date>-<card>/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}       # the caller's own path kept after the repository
BUDGET=${1:-480}
STAGES=${2:-env,parity,autotune_cold,determinism,cuda_graph,graph_train,targets,profile,train_demo,bench}
PY=${PYTHON:-python3}                 # the device image: python3 is the one that holds PyTorch
DEVICE=${DEVICE:-cuda}                 # DEVICE=cpu: a smoke run of this script where there is no GPU
if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1            # the Triton kernels run in the interpreter (autotune_cold, parity, ...)
fi
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if '$DEVICE' == 'cuda' else 'cpu')")
# the time as well: a second call on the same day and card gets a folder of its own
RESULTS=${RESULTS:-benchmarks/results/$(date -u "+%F-$CARD-%H%M%S")}
"$PY" -m cmath_mer.gpucheck --device "$DEVICE" --out "$RESULTS" --stages "$STAGES" --budget "$BUDGET" --jobs 12
rc=$?
# no checkpoints, nor their temporaries (.best.safetensors.XXXX.tmp): a demo checkpoint is ~188 MB, and the
# device tool brings back no file over ~16 MiB, so the whole tarball would be lost
tar czf "${OUT:-/tmp}/gpucheck.tgz" --exclude='*.safetensors*' --exclude='*.pt' --exclude='*.tmp' "$RESULTS"
cat "$RESULTS/summary.md"
RERUN=$("$PY" -c "import json, sys; print(','.join(json.load(open(sys.argv[1])).get('rerun', [])))" \
        "$RESULTS/summary.json" 2>/dev/null)
if [ -n "$RERUN" ]; then
  echo "not finished; second call: tools/gpu_session.sh $BUDGET $RERUN"
fi
exit $rc
