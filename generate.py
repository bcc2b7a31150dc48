"""Sample text from a checkpoint (optionally with a LoRA adapter and a chat template).

    python generate.py --checkpoint tests/fixtures/models/stories260K --prompt "Once upon a time"
    python generate.py --checkpoint out --template alpaca --prompt "Name a color."  # a run's --out

Decoding runs the prompt through the model once ("prefill"), keeping every layer's keys and
values in a KV cache; each new token then costs one position's work.
"""
import sys
from pathlib import Path
from typing import Iterator

import torch

from data import encode_prompt, resolve_template
from errors import (ArgumentParser, UserError, default_device, device_name, fraction,
                    non_negative_float, positive_int, run_cli, seed)
from model import DEFAULT_PRECISION, PRECISIONS, KVCache, Transformer, default_precision
from templates import TEMPLATES, get_template


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits.

    temperature 0 → argmax (greedy). Otherwise softmax(logits / T), restricted to the k most
    likely tokens (top-k) and/or the smallest set whose probability reaches p (top-p, nucleus).
    """
    if temperature <= 0:
        return int(logits.argmax())
    # In float64 and less the maximum, so that a tiny temperature (1e-30) sends the other tokens
    # to -inf, probability 0, instead of overflowing to inf, where softmax gives nan.
    logits = logits.double()
    logits = (logits - logits.max()) / temperature
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
             generator: torch.Generator | None = None,
             cache: "PrefixCache | None" = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop token, max_new_tokens or a full context.
    With a PrefixCache (chat.py), the start of the prompt that it holds already is not run again."""
    if max_new_tokens < 1:  # (else the check below would blame the prompt)
        raise UserError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    # where the blocks compute (QLoRA may keep the embedding in CPU memory: quant.HostEmbedding)
    device = model.norm.weight.device
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_seq_len)
    if len(prompt_ids) >= max_len:
        raise UserError(f"prompt has {len(prompt_ids)} tokens; the model's context is "
                        f"{model.config.max_seq_len}")
    was_training = model.training
    model.eval()
    if cache is None:
        cache = PrefixCache(model, max_len)
    kv = cache.kv
    new = prompt_ids[cache.reuse(prompt_ids):]
    tokens = torch.tensor([new], device=device)
    try:
        for _ in range(max_new_tokens):
            if kv.length + tokens.shape[1] > max_len:
                return  # context full
            # (a model may have spare embedding rows past the tokenizer's last id: never pick them)
            logits = model(tokens, cache=kv)[0, -1, :tokenizer.vocab_size]
            cache.ids += tokens[0].tolist()
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if next_id in tokenizer.stop_ids:
                return
            yield next_id
            tokens = torch.tensor([[next_id]], device=device)
    finally:
        model.train(was_training)


class PrefixCache:
    """A KV cache and the ids whose keys and values it holds. Kept from one prompt to the next (a
    chat's turns), it saves re-running the start they share: attention at a position depends only
    on the tokens up to it, so the cached keys and values of a shared prefix are what running it
    again would compute."""

    def __init__(self, model: Transformer, max_len: int | None = None):
        dtype = model.norm.weight.dtype
        self.kv = KVCache(model.config, 1, max_len or model.config.max_seq_len,
                          device=model.norm.weight.device,
                          dtype=dtype if dtype.is_floating_point else torch.float32)
        self.ids = []

    def reuse(self, prompt_ids: list[int]) -> int:
        """Keep the longest cached prefix of `prompt_ids` (leaving at least its last token to run,
        for the logits of the next one); returns its length."""
        shared = 0
        limit = min(len(self.ids), len(prompt_ids) - 1)
        while shared < limit and self.ids[shared] == prompt_ids[shared]:
            shared += 1
        self.kv.length = shared  # what lies beyond is overwritten
        self.ids = self.ids[:shared]
        return shared


def parse_args(argv=None, description: str = __doc__, chat: bool = False):
    """generate.py's flags; with chat=True chat.py's (--system instead of --prompt)."""
    p = ArgumentParser(description=description)
    a = p.add_argument
    a("--checkpoint", required=True,
      help="checkpoint directory or file (HF, Meta, llama2.c, GGUF, ours), or the --out directory "
      "of a training run (its model/, or its adapter/ on the run's base model), or its best/")
    a("--tokenizer", help="tokenizer.model path (default: found in the checkpoint directory)")
    a("--adapter", help="LoRA adapter directory saved by train_sft.py, applied on top of "
      "--checkpoint (default: none)")
    if chat:
        a("--system", help="system prompt (default: none, or the template's own default)")
    else:
        a("--prompt", default="", help="text to continue, after BOS if the tokenizer uses one "
          "(default: empty, the model starts from BOS alone)")
    a("--template", default="auto", choices=["auto", *TEMPLATES],
      help="wrap --prompt as an instruction with this template; auto: the one a training run "
      "used (its config.json), else the checkpoint's own chat template, else none (raw text)")
    a("--max-new-tokens", type=positive_int, default=256, help="stop after this many new tokens")
    a("--temperature", type=non_negative_float, default=0.8,
      help="divide the logits by this before sampling; 0 = greedy")
    a("--top-k", type=positive_int, help="sample among the k most likely tokens (default: all)")
    a("--top-p", type=fraction, help="sample among the most likely tokens whose probabilities add "
      "up to p, in (0, 1] (default: 1, all)")
    a("--seed", type=seed, default=1337, help="seed of the sampling, in [0, 2**63)")
    a("--device", type=device_name, default=default_device(), help="cpu, cuda, cuda:N or mps")
    a("--precision", choices=["bf16", "fp16", "fp32"],
      help=f"the dtype the products run in; the weights are loaded in it, as nothing is "
      f"trained (default: {DEFAULT_PRECISION})")
    return p.parse_args(argv)


def resolve_run_dir(args):
    """A training run's --out directory stands for what the run produced: its model/ (full
    fine-tuning or --merge), else its adapter/ on the base model named in its config.json.
    Returns (checkpoint, adapter, tokenizer: a path, None or a ByteTokenizer, the run's config);
    paths that are not a run come back as given, with config None. A one-line note on stderr says
    what was chosen."""
    from run.run_dir import run_config
    from tokenizer import ByteTokenizer
    config = run_config(args.checkpoint)
    if config is None:
        return args.checkpoint, args.adapter, args.tokenizer, None
    run = Path(args.checkpoint)
    inputs = config.get("inputs") or {}
    demo = config.get("checkpoint") is None  # the built-in demo: byte tokens, weights never saved
    if (run / "model").is_dir():
        tokenizer = args.tokenizer or (ByteTokenizer() if demo else None)
        print(f"note: {run} is a training run: using its fine-tuned model {run / 'model'}",
              file=sys.stderr)
        return run / "model", args.adapter, tokenizer, config
    if not (run / "adapter").is_dir():
        holds = ", ".join(sorted(p.name for p in run.iterdir() if not p.name.startswith(".")))
        raise UserError(f"{run} is a training run without a model/ or adapter/ (it holds {holds}): "
                        "it has not finished; continue it with train_sft.py --resume")
    if args.adapter:
        raise UserError(f"--checkpoint {run} is a training run that brings its own adapter; leave "
                        "out --adapter")
    if demo:
        raise UserError(f"{run} holds an adapter for the built-in demo model, whose random weights "
                        "were never saved: there is no base model to apply it to")
    base = (inputs.get("checkpoint") or {}).get("path") or config["checkpoint"]
    if not Path(base).exists():
        raise UserError(f"{run} was trained on {base} (its config.json), which is not there any "
                        f"more; pass --checkpoint BASE --adapter {run / 'adapter'}")
    run_tokenizer = (inputs.get("tokenizer") or {}).get("path") or config.get("tokenizer")
    tokenizer = args.tokenizer or run_tokenizer
    print(f"note: {run} is a training run: using its adapter {run / 'adapter'} on its base model "
          f"{base}", file=sys.stderr)
    return base, run / "adapter", tokenizer, config


def load_for_generation(args):
    """(model, tokenizer, template) of the --checkpoint (a run, a model, with --adapter), for
    generate.py and chat.py. The template: --template; auto is the run's own (config.json), else
    the checkpoint's chat template, else none. Said on stderr."""
    from formats.checkpoint import load_checkpoint
    from tokenizer import ByteTokenizer, check_vocabulary, checkpoint_tokenizer
    checkpoint, adapter, tokenizer, run = resolve_run_dir(args)
    precision = args.precision or default_precision(args.device)
    if not isinstance(tokenizer, ByteTokenizer):
        tokenizer = checkpoint_tokenizer(checkpoint, tokenizer)
    model, _ = load_checkpoint(checkpoint, device=args.device, dtype=PRECISIONS[precision])
    check_vocabulary(tokenizer, model.config.vocab_size)
    if adapter:
        from formats.adapter import load_adapter
        load_adapter(model, adapter)
    if args.template == "auto" and run and run.get("template"):
        template = get_template(run["template"])
        note(f"template: {template.name} (the one {args.checkpoint} was trained with)")
    else:
        template = resolve_template(args.template, tokenizer, fallback="none", say=note)
    return model, tokenizer, template


def note(line: str):
    """A line about what was chosen, on stderr: stdout holds only the generated text."""
    print(line, file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    model, tokenizer, template = load_for_generation(args)
    prompt_ids = encode_prompt(args.prompt, tokenizer, template)
    if not prompt_ids:
        raise UserError(f"the prompt is empty and tokenizer {tokenizer.path.name} starts no text "
                        "with BOS: give a --prompt")
    generator = torch.Generator(args.device).manual_seed(args.seed)

    stream = sys.stdout.isatty()
    ids = []
    printed = ""  # what has been printed of tokenizer.decode(ids) so far
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
