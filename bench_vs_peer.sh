#!/usr/bin/env bash
# Side by side on one GPU: the peer harness (HF transformers + PEFT) and bench.py, same shape and
# flags, one JSON line each. Extra flags for bench.py only (e.g. --compile) go in $OURS.
#   bash bench_vs_peer.sh ../shared/bench/peer_hf_peft.py 1b      # llama-3.2-1b LoRA + full
#   bash bench_vs_peer.sh ../shared/bench/peer_hf_peft.py 8b      # llama-3-8b / llama-2-7b LoRA
set -u
peer=$1; shift
pair() {  # the peer first, then ours, with the same arguments
  echo "# $*"
  timeout 500 python3 "$peer" "$@" 2>&1 | grep -E '^\{|Error|error' | tail -2
  timeout 500 python3 bench.py "$@" ${OURS:-} 2>&1 | grep -E '^\{|Error|error' | tail -2
}
for group in "$@"; do
  case $group in
    1b)  pair --shape llama-3.2-1b --method lora --batch-size 8 --seq-len 2048
         pair --shape llama-3.2-1b --method full --batch-size 8 --seq-len 2048 ;;
    8b)  pair --shape llama-3-8b --method lora --batch-size 2 --seq-len 2048
         pair --shape llama-3-8b --method lora --batch-size 4 --seq-len 2048 --grad-ckpt
         pair --shape llama-2-7b --method lora --batch-size 4 --seq-len 2048 ;;
    8b-long)  pair --shape llama-3.1-8b --method lora --batch-size 2 --seq-len 4096 ;;
    8b-small) timeout 500 python3 bench.py --shape llama-3-8b --method lora --batch-size 1 --seq-len 2048 --grad-ckpt ${OURS:-} ;;
    *) echo "unknown group $group (1b, 8b, 8b-long, 8b-small)"; exit 2 ;;
  esac
done
