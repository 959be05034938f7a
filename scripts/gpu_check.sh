#!/usr/bin/env bash
# The GPU run behind docs/benchmarks.md, "GPU" (issue 16 item 6); also `nox -s gpu`.
#
#   scripts/gpu_check.sh [OUT]        # OUT defaults to docs/gpu
#
# 1. lorakit bench on CUDA, compiled, bf16 base, hidden 2048 x 8 layers (absolute times
#    hold only there): OUT/bench-cuda.{json,md}, docs/img/bench-cuda-compile.png;
# 2. the compile tests (fullgraph, no recompiles, compiled == eager) with the model on CUDA;
# 3. the conformance kit over every combination on CUDA;
# 4. the autocast axis (bf16, fp16; eager and inductor) for every recipe on CUDA.
# Each step's log goes to OUT/*.txt; the script goes on after a failing step and
# exits non-zero at the end if any failed. Needs a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/gpu}
mkdir -p "$OUT" docs/img
python -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'" || exit 2
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"; } > "$OUT/environment.txt" 2>&1
status=0
run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local start=$SECONDS
  "$@" >> "$OUT/$name.txt" 2>&1 || { echo "FAILED: $name" | tee -a "$OUT/$name.txt"; status=1; }
  echo "($((SECONDS - start)) s)" | tee -a "$OUT/$name.txt"
}
run bench lorakit bench --device cuda --compile --dtype bfloat16 --hidden 2048 --layers 8 --no-progress \
    --json "$OUT/bench-cuda.json" --markdown "$OUT/bench-cuda.md" --plot docs/img/bench-cuda-compile.png
run compile-tests env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_compile.py
run conformance env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_conformance.py
run autocast env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_autocast.py -k cuda
exit $status
