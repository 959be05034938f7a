#!/usr/bin/env bash
# The GPU run behind docs/benchmarks.md, "GPU"; also `nox -s gpu`. One short script (~8 minutes at most:
# each step has its own time limit), which goes on after a failing step and exits non-zero at the end.
#
#   scripts/gpu_check.sh [--dry-run] [OUT]    # OUT: the argument, else $OUT, else docs/gpu
#
# 0. installs this checkout's packages (editable, no dependencies, no network) when lorakit is missing;
# 1. lorakit bench on CUDA, compiled, bf16 base, hidden 2048 x 8 layers, against PEFT:
#    OUT/bench-cuda.{json,md,png} (absolute times hold only there);
# 2. the MoE bench (LoRA on a Qwen3-MoE's fused experts, lorakit against PEFT): OUT/bench-moe.{json,md};
# 3. the quantized fused path: lorakit bench --quantize nf4 (QLoRA, QDoRA against PEFT's), fp32 compute:
#    OUT/bench-nf4.{json,md}; and tests/test_quantized_fused.py on CUDA (fused = generic path);
# 4. the compile tests (fullgraph, no recompiles, compiled == eager) with the model on CUDA;
# 5. the conformance kit over every combination on CUDA;
# 6. the autocast axis (bf16, fp16; eager and inductor) for every recipe on CUDA.
# Each step's log goes to OUT/<step>.txt, its wall time to OUT/summary.md with the step's status.
# --dry-run prints the steps and checks that every bench command line passes the bench's checks, on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-${OUT:-docs/gpu}}
mkdir -p "$OUT"
status=0
check_bench() {  # a bench command line parses and passes the bench's own checks (the device aside)
  python - "$@" <<'PY'
import argparse, sys
from lorakit.bench import cli
parser = argparse.ArgumentParser()
cli.configure(parser)
args = parser.parse_args(sys.argv[1:])
args.device = "cpu"
(cli.moe_config_from_args if args.model == "moe" else cli.config_from_args)(args)
PY
}
run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  if [ $DRY = 1 ]; then
    echo "$name (<= ${limit} s): $*"
    local out
    if [ "$1 ${2:-}" = "lorakit bench" ] && ! out=$(check_bench "${@:3}" 2>&1); then
      echo "  refused: $(echo "$out" | tail -1)"; status=1
    fi
    return
  fi
  echo "== $name: $*" | tee "$OUT/$name.txt"
  local start=$SECONDS result=ok
  timeout "$limit" "$@" >> "$OUT/$name.txt" 2>&1 || { result="FAILED (rc $?)"; status=1; }
  echo "$name: $result ($((SECONDS - start)) s)" | tee -a "$OUT/$name.txt"
  echo "| $name | $result | $((SECONDS - start)) |" >> "$OUT/summary.md"
}
if [ $DRY = 0 ]; then
  python -c "import lorakit.core, lorakit.bench" 2>/dev/null || python -m pip install -q --no-deps \
      --no-build-isolation $(sed -n 's/^-e \(.*\)$/-e \1/p' requirements-dev.txt) > "$OUT/install.txt" 2>&1
  python -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'" || exit 2
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"; } > "$OUT/environment.txt" 2>&1
  printf '| step | result | wall s |\n|---|---|---|\n' > "$OUT/summary.md"
fi
BENCH="lorakit bench --device cuda --no-progress"
run bench 150 $BENCH --compile --dtype bfloat16 --hidden 2048 --layers 8 --steps 2 --repeats 4 \
    --json "$OUT/bench-cuda.json" --markdown "$OUT/bench-cuda.md" --plot "$OUT/bench-cuda.png"
run bench-moe 60 $BENCH --model moe --experts 8,32 --json "$OUT/bench-moe.json" --markdown "$OUT/bench-moe.md"
run bench-nf4 45 $BENCH --quantize nf4 --recipes lora,dora --peft lora,dora --hidden 1024 \
    --json "$OUT/bench-nf4.json" --markdown "$OUT/bench-nf4.md"
run quantized-fused 30 env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_quantized_fused.py
run compile-tests 60 env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_compile.py
run conformance 60 env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_conformance.py
run autocast 45 env LORAKIT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_autocast.py -k cuda
[ $DRY = 1 ] && [ $status = 0 ] && echo "dry run: every bench command line passes the bench's checks"
exit $status
