#!/usr/bin/env bash
# Side by side on one GPU, in one command: the strongest peer stack of each row and ours
# (python -m bench), same shape and flags, one JSON line each. The peer is Hugging Face
# transformers + PEFT with Liger kernels (fused RMSNorm, RoPE, SwiGLU, linear cross-entropy);
# for QLoRA, with bitsandbytes NF4. Ours runs with --compile (extra flags for ours only go in
# $OURS, e.g. OURS="--compile --profile").
#   bash bench/bench_vs_peer.sh bench/peer_hf_peft.py 1b 8b    # the peer harness beside it
# Groups: 1b (llama-3.2-1b LoRA and full), 8b (llama-3-8b / llama-2-7b LoRA), 8b-long (seq 4096),
# qlora (llama-3-8b QLoRA with checkpointing), plain (the 1B and 8B LoRA rows against HF+PEFT
# alone).
set -u
peer=$(realpath "$1")
cd "$(dirname "$0")/.."  # the project root: python -m bench runs from there
shift
OURS=${OURS:---compile}
run() {  # one benchmark script and its flags: its JSON line (or its error), and with
  # OURS="--compile --profile" our profile of the row (kernel time by class, memory peak)
  timeout 500 python3 "$@" 2>&1 | grep -v '^Backend impl' |
    grep -E '^\{|Error|error|^one step|^  |^matmul ceiling|^the [0-9]+ costliest|^memory at'
}
pair() {  # $1: the peer's own flags; the rest: flags for both
  local peer_flags=$1
  shift
  echo "# $* | peer: ${peer_flags:-plain HF+PEFT} | ours: $OURS"
  run "$peer" "$@" $peer_flags
  run -m bench "$@" $OURS
}
for group in "$@"; do
  case $group in
    1b)
      pair --liger --shape llama-3.2-1b --method lora --batch-size 8 --seq-len 2048
      pair --liger --shape llama-3.2-1b --method full --batch-size 8 --seq-len 2048
      run -m bench --shape llama-3.2-1b --method full --batch-size 8 --seq-len 2048 \
        --pure-bf16 $OURS
      ;;
    8b)
      pair --liger --shape llama-3-8b --method lora --batch-size 2 --seq-len 2048
      pair --liger --shape llama-3-8b --method lora --batch-size 4 --seq-len 2048 --grad-ckpt
      pair --liger --shape llama-2-7b --method lora --batch-size 4 --seq-len 2048
      ;;
    8b-long)
      pair --liger --shape llama-3-8b --method lora --batch-size 2 --seq-len 4096
      ;;
    qlora)
      pair --liger --shape llama-3-8b --method qlora --batch-size 2 --seq-len 2048 --grad-ckpt
      ;;
    plain)
      pair "" --shape llama-3.2-1b --method lora --batch-size 8 --seq-len 2048
      pair "" --shape llama-3-8b --method lora --batch-size 2 --seq-len 2048
      ;;
    *)
      echo "unknown group $group (1b, 8b, 8b-long, qlora, plain)"
      exit 2
      ;;
  esac
done
