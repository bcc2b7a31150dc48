"""Sample text from a checkpoint (optionally with a LoRA adapter and a chat template).

    python generate.py --checkpoint ../shared/models/stories260K --prompt "Once upon a time" --temperature 0

Decoding runs the prompt through the model once ("prefill"), keeping every layer's keys and
values in a KV cache; each new token then costs one position's work.
"""
import argparse
import sys
from typing import Iterator

import torch

from errors import UserError, run_cli
from model import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits.

    temperature 0 → argmax (greedy). Otherwise softmax(logits / T), restricted to the k most
    likely tokens (top-k) and/or the smallest set whose probability reaches p (top-p, nucleus).
    """
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt_ids: list[int], max_new_tokens: int = 256,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token or max_new_tokens (or the context is full)."""
    device = next(model.parameters()).device
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_seq_len)
    if len(prompt_ids) >= max_len:
        raise UserError(f"prompt has {len(prompt_ids)} tokens; the model's context is {model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, 1, max_len, device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
    tokens = torch.tensor([prompt_ids], device=device)
    try:
        for _ in range(max_new_tokens):
            if cache.length + tokens.shape[1] > max_len:
                return  # context full
            logits = model(tokens, cache=cache)[0, -1]
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if next_id in tokenizer.stop_ids:
                return
            yield next_id
            tokens = torch.tensor([[next_id]], device=device)
    finally:
        model.train(was_training)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or file (HF, Meta, llama2.c, GGUF, ours)")
    p.add_argument("--tokenizer", help="tokenizer.model path (default: found in the checkpoint directory)")
    p.add_argument("--adapter", help="LoRA adapter directory saved by train_sft.py, applied on top of --checkpoint")
    p.add_argument("--prompt", default="", help="text to continue (encoded with BOS first)")
    p.add_argument("--template", default="none",
                   help="wrap --prompt as an instruction with this template (alpaca, llama2-chat, llama3-chat; none = raw text)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)

    from checkpoint import load_checkpoint
    from tokenizer import checkpoint_tokenizer
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    model, _ = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype)
    tokenizer = checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    if args.adapter:
        from lora import load_adapter
        load_adapter(model, args.adapter)
    if args.template != "none":
        from data import encode_prompt, get_template
        prompt_ids = encode_prompt(args.prompt, tokenizer, get_template(args.template))
    else:
        prompt_ids = tokenizer.encode(args.prompt, bos=True)
    generator = torch.Generator(args.device).manual_seed(args.seed)

    stream = sys.stdout.isatty()
    ids, printed = [], ""
    for token in generate(model, tokenizer, prompt_ids, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, generator):
        ids.append(token)
        if stream:  # decode the whole continuation each time: multi-byte characters span tokens
            text = tokenizer.decode(ids)
            print(text[len(printed):], end="", flush=True)
            printed = text
    if not stream:
        print(tokenizer.decode(ids), end="")
    print()
    print(f"[{len(prompt_ids)} prompt + {len(ids)} generated tokens]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
