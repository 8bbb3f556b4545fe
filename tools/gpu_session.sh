#!/usr/bin/env bash
# One call on a lent GPU (the device tool's `run`): the GPU check in priority order inside a time budget, with
# the machine's own torch and triton (nothing installed), results packed into $OUT. Usage, from the repository
# root on the device machine:  tools/gpu_session.sh [BUDGET_SECONDS] [STAGES]
# Order: parity first (kernels changed since the last GPU run have never run on a GPU), then issue 10's
# targets, the --cuda-graphs training path, and the rest. A second call with the stages the summary lists as
# SKIPPED finishes the check. Results: benchmarks/results/<date>-<card>/ (commit them from $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
BUDGET=${1:-480}
STAGES=${2:-env,parity,targets,graph_train,cuda_graph,determinism,autotune_cold,profile,train_demo,bench}
PY=${PYTHON:-python3}                 # the device image: python3 is the one that holds PyTorch
DEVICE=${DEVICE:-cuda}                 # DEVICE=cpu: a smoke run of this script where there is no GPU
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if '$DEVICE' == 'cuda' else 'cpu')")
RESULTS=${RESULTS:-benchmarks/results/$(date -u +%F)-$CARD}
"$PY" -m cmath_mer.gpucheck --device "$DEVICE" --out "$RESULTS" --stages "$STAGES" --budget "$BUDGET" --jobs 12
rc=$?
tar czf "${OUT:-/tmp}/gpucheck.tgz" --exclude='*.safetensors' --exclude='*.pt' "$RESULTS"
cat "$RESULTS/summary.md"
exit $rc
