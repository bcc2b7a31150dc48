"""What the model says, before and after: the sample prompts a run answers, and one training
record's loss token by token (run/report.py shows both).

Before the first step the base model answers the prompts; at each evaluation and at the end the
tuned model answers them again, greedily, with the run's template, at most --sample-tokens N
tokens: what `generate.py --checkpoint OUT --temperature 0 --max-new-tokens N --prompt P`
answers. Each answer is one row of out/samples.jsonl:

    {"step": 0, "prompt": "Name a color.", "answer": "Blue.", "tokens": 3,
     "ended_with_end_token": true}

A model that never says its end token rambles on to the token limit: the most common failure of
SFT, which the loss alone does not show. out/token_losses.jsonl holds, at the same steps, the loss
of every token of one training record (null for prompt tokens, which are not trained).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from generate import generate
from model import IGNORE_INDEX, next_token_targets
from run.report import write_report
from run.run_dir import SAMPLES, TOKEN_LOSSES
from run.run_metrics import log_metrics

DEFAULT_PROMPTS = 3  # how many records answer when --sample-prompt is not given


def default_prompts(train_records: list, val_records: list, demo: bool) -> list[dict]:
    """The first few held-out records: answers the model was not trained on. The demo's tiny model
    can only memorise, so it answers training records; so does a run without held-out data."""
    records = train_records if demo or not val_records else val_records
    return records[:DEFAULT_PROMPTS]


def prompt_text(prompt) -> str:
    """What the report shows of a prompt: a --sample-prompt as given, a record's last
    instruction (and its input)."""
    if isinstance(prompt, str):
        return prompt
    turn = prompt["turns"][-1]  # (records.load_records normalised it)
    return turn["instruction"] + (f"\n\n{turn['input']}" if turn["input"] else "")


def prompt_ids(prompt, tokenizer, template, seq_len: int, log) -> list[int]:
    """The ids of a sample prompt, cut as a training example is cut: its end off, so that it and
    the first answer token fit in --seq-len."""
    ids = data.encode_prompt(prompt, tokenizer, template)
    if len(ids) >= seq_len:
        log.say(f"note: the sample prompt has {len(ids)} tokens; answering its first {seq_len - 1} "
                f"(--seq-len {seq_len}, less the first answer token), as training examples are cut")
        ids = ids[:seq_len - 1]
    return ids


def answer(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The greedy answer to a prompt, and whether it ended with an end token. generate() stops
    before max_new_tokens for one of two reasons: an end token, or a full context (it then
    yields one token past the context, which it never runs)."""
    tokens = list(generate(model, tokenizer, ids, max_new_tokens, temperature=0.0))
    ended = len(tokens) < max_new_tokens and len(ids) + len(tokens) <= model.config.max_seq_len
    return tokens, ended


@torch.no_grad()
def token_losses(model, ids: list[int], labels: list[int]) -> list[float | None]:
    """The cross-entropy of each token given those before it (model.loss's sum, token by token);
    None where the label is masked (the prompt, unless --train-on-prompt) and for the first token,
    which nothing predicts."""
    was_training = model.training
    model.eval()
    device = model.norm.weight.device
    logits = model(torch.tensor([ids], device=device))[0].float()
    targets = next_token_targets(torch.tensor([labels], device=device))[0]
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    model.train(was_training)
    # position t predicts token t+1: token t's loss is the one computed at t-1
    return [None] + [float(loss) if label != IGNORE_INDEX else None
                     for loss, label in zip(losses.tolist(), labels[1:])]


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, as it shows in the whole decoded text (SentencePiece drops a lone
    piece's leading space; a special token is shown by its name)."""
    names = {token: text for text, token in tokenizer.special.items()}
    names.setdefault(tokenizer.bos_id, "<bos>")
    names.setdefault(tokenizer.eos_id, "<eos>")
    pieces, ordinary, shown = [], [], ""
    for token in ids:
        if token in names:
            pieces.append(names[token])
            continue
        ordinary.append(token)
        text = tokenizer.decode(ordinary)
        pieces.append(text[len(shown):])
        shown = text
    return pieces


@dataclass
class Samples:
    """The prompts a run answers and the training record it shows token by token, encoded once."""
    prompts: list[str]              # as the report shows them
    prompt_ids: list[list[int]]
    record_example: tuple[list[int], list[int]]  # (ids, labels) of one training example
    tokenizer: object
    max_new_tokens: int  # --sample-tokens; 0: no prompts are answered

    def record(self, model, step: int, out: Path, log):
        """Answer every prompt and measure the record's token losses; log them, and draw the
        report again. (Under torchrun every rank answers, as the sharded model needs; one
        writes.)"""
        rows = []
        for text, ids in zip(self.prompts, self.prompt_ids) if self.max_new_tokens else []:
            tokens, ended = answer(model, self.tokenizer, ids, self.max_new_tokens)
            rows.append({"step": step, "prompt": text, "answer": self.tokenizer.decode(tokens),
                         "tokens": len(tokens), "ended_with_end_token": ended})
        ids, labels = self.record_example
        losses = token_losses(model, ids, labels)
        if not log.speaks:
            return
        for row in rows:
            log_metrics(out, row, SAMPLES)
        log_metrics(out, {"step": step, "tokens": token_pieces(self.tokenizer, ids),
                          "losses": losses}, TOKEN_LOSSES)
        log.samples(rows)
        write_report(out)


def make_samples(config, train_records, val_records, tokenizer, template, log) -> Samples:
    """The run's Samples: --sample-prompt (each one given), else default_prompts; the record shown
    token by token is the first training record that keeps a target token within --seq-len."""
    prompts = config.sample_prompt or default_prompts(train_records, val_records,
                                                      demo=config.checkpoint is None)
    ids = [prompt_ids(p, tokenizer, template, config.seq_len, log) for p in prompts]
    examples = (data.encode_example(record, tokenizer, template, config.seq_len,
                                    config.train_on_prompt) for record in train_records)
    example = next(e for e in examples if e is not None)  # (encode_dataset kept one at least)
    return Samples([prompt_text(p) for p in prompts], ids, example, tokenizer,
                   config.sample_tokens)
