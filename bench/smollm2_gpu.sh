#!/usr/bin/env bash
# Issue 24's SmolLM2-135M measurements in one GPU call (bench/smollm2_gpu.py says what and how):
#   python bench/smollm2_gpu.py prepare --gguf SmolLM2.gguf --data alpaca_data_1k.json --out gpu_carry
#   bash bench/smollm2_gpu.sh gpu_carry [BUDGET_S] [--tiny]     # carry gpu_carry/
# gpu_carry/wheels/*.whl (liger-kernel), if there, is installed for the peer's Liger run. The JSON
# lines also go to $OUT/smollm2_gpu.jsonl when $OUT is set.
set -u
cd "$(dirname "$0")/.."
carry=${1:-gpu_carry}
budget=${2:-500}
shift $(($# < 2 ? $# : 2))
liger=()
if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/liger "$carry"/wheels/*.whl && liger=(--liger-path /tmp/liger)
fi
python3 bench/smollm2_gpu.py run "$carry" --budget "$budget" "${liger[@]}" "$@" 2>&1 |
  tee "${OUT:-/tmp}/smollm2_gpu.jsonl"
