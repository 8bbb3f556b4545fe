#!/usr/bin/env bash
# The package against the older Triton the GPU machines carry (triton 3.6, torch >= 2.11): a virtualenv with
# triton 3.6.0 beside the pinned torch 2.13.0 runs the interpreter parity tests and compiles one config of
# every kernel for sm_90 and sm_80 ahead of time. Usage: tools/check_triton36.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${VENV:-/tmp/venv-t36}}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q triton==3.6.0
    "$VENV/bin/pip" install -q numpy einops safetensors scikit-learn tqdm matplotlib pytest
fi
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
. "$VENV/bin/activate"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); \
assert triton.__version__.startswith('3.6'), triton.__version__; assert torch.__version__.startswith('2.13')"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m pytest -q -p no:cacheprovider tests/kernels/test_attention.py \
    tests/kernels/test_attention_sources.py tests/kernels/test_attention_onepass.py tests/kernels/test_reconstruction_loss.py \
    tests/kernels/test_variational_fusion.py tests/model/test_model_backends.py tests/kernels/test_ops.py tests/model/test_compile.py
python -m cmath_mer.kernels.aot --jobs "${JOBS:-2}" --one-per-kernel
