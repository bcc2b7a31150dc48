r"""Instruction data → token ids with a loss mask → batches.

    alpaca.json / chat.jsonl ─► load_records ─► {"system": str | None, "turns": [{"instruction", "input", "output"}, ...]}
        ─► encode_example (a Template writes the turns out) ─► (input_ids, labels)
        ─► batching.make_batches (pad + group by length, or pack) ─► {"tokens", "labels", "positions", "doc_ids", "lengths"}

    python data.py --data ../shared/data/alpaca_data_1k.json --tokenizer ../shared/models/llama2-tokenizer --show 2

What is trained on. `labels` line up with `input_ids` (Hugging Face's convention; model.loss shifts
them by one, so position t learns to predict labels[t+1]). labels[t] = input_ids[t] where token t is
a target and IGNORE_INDEX where it is not. Targets are every assistant answer plus its end-of-turn
token (EOS, or <|eot_id|> for Llama-3), so the model learns to stop; system text, prompts and padding
are masked. labels[0] (BOS) is never a target: in a packed row the token before it is the previous
example's last one, which must not learn to predict the start of an unrelated example.

How the loss is normalised (train_sft.py does it): the summed token loss of the whole accumulated
batch divided by the number of target tokens in it, a mean over target tokens, not a mean of
per-example means. Every target token then counts the same. A mean of per-example means would give
the two tokens of "Paris." the weight of a 300-token essay, and its value would change with how the
examples happen to be split into micro-batches, so gradient accumulation would differ from one big batch.

Exact prompt/answer boundary. The masked prompt must be exactly what generation sees, encode_prompt(),
so it is tokenized on its own. The answer must continue it as one text would: SentencePiece (Llama-2)
puts a "▁" (space) before the first word of every separately encoded string, so encode("Paris") is
"▁Paris", while after "### Response:\n" the text "Paris" is tokenized without it. `encode_text(...,
continuation=True)` encodes "\n" + answer and drops the ids of "\n": newlines are byte tokens in every
LLaMA SentencePiece vocabulary and never merge, so what follows is tokenized as it is in the full
text. Llama-3's tiktoken adds no prefix, and Meta's own chat format encodes each piece separately.
"""
import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path


from batching import batch_efficiency, make_batches
from errors import UserError, run_cli
from model import IGNORE_INDEX
from tokenizer import SentencePieceTokenizer, Tokenizer

# ── Reading records ──────────────────────────────────────────────────────────────────────────────

ROLES = ("system", "user", "assistant")


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), "null")


def load_records(path) -> list[dict]:
    """Read Alpaca or chat records from a JSON array or a JSON Lines file, normalised to
    {"system": str or None, "turns": [{"instruction": str, "input": str, "output": str}, ...]}.
    "system" is None when the record has no system message, and "" when it has an empty one:
    official chat templates write the two differently.

    Accepted records: Alpaca {"instruction", "input" (optional), "output"}, with LLaMA-Factory's
    optional "history": [[user, assistant], ...] (earlier turns) and "system"; or chat
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}. Other keys are ignored.
    """
    path = Path(path)  # messages name it as the user typed it
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        places = [f"record {i}" for i in range(1, len(items) + 1)]
    else:  # JSON Lines, one record per line: messages name the line, which is what an editor shows
        items, places = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: not valid JSON ({e.msg}); expected a JSON array "
                                "of records or JSON Lines (one object per line)") from None
            places.append(f"line {lineno}")
    if not items:
        raise UserError(f"{path}: no records")
    return [normalize_record(item, f"{path}: {place}") for item, place in zip(items, places)]


def normalize_record(record, where: str = "record") -> dict:
    """One raw record (Alpaca, Alpaca + history, or chat messages) → the internal shape."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {_json_type(record)}")
    if "messages" in record:
        return _from_messages(record["messages"], where)
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"{where}: missing key {key!r} (Alpaca records need 'instruction' and 'output'; "
                            "chat records need 'messages')")
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair) for pair in history):
        raise UserError(f"{where}: 'history' must be a list of [user, assistant] string pairs")
    turns = [{"instruction": user, "input": "", "output": answer} for user, answer in history]
    turns.append({key: _string(record, key, where) for key in ("instruction", "input", "output")})
    system = _string(record, "system", where) if record.get("system") is not None else None
    return {"system": system, "turns": turns}


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None and key == "input":  # optional: absent or null means empty
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {_json_type(value)}")
    return value


def _from_messages(messages, where: str) -> dict:
    """Chat messages → turns. Roles must go (system), user, assistant, user, assistant, ...: every
    user message gets the answer that follows it, and the answer is what is trained on."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty array of {{role, content}} objects")
    system, turns = None, []  # None: no system message (a template may then write its default)
    for i, message in enumerate(messages, 1):
        at = f"{where}: message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{at}: expected an object with 'role' and 'content'")
        role, content = message["role"], _string(message, "content", at)
        if role not in ROLES:
            raise UserError(f"{at}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if role == "system":
            if i != 1:
                raise UserError(f"{at}: a system message must be the first message")
            system = content
        elif role == "user":
            if turns and turns[-1]["output"] is None:
                raise UserError(f"{at}: two user messages in a row (user and assistant must alternate)")
            turns.append({"instruction": content, "input": "", "output": None})
        else:
            if not turns or turns[-1]["output"] is not None:
                raise UserError(f"{at}: an assistant message must follow a user message")
            turns[-1]["output"] = content
    if not turns or turns[0]["output"] is None:
        raise UserError(f"{where}: the conversation has no assistant message, so nothing to train on")
    if turns[-1]["output"] is None:
        raise UserError(f"{where}: the conversation ends with a user message; the last message must be the "
                        "assistant's answer")
    return {"system": system, "turns": turns}


# ── Templates: how a conversation is written out ─────────────────────────────────────────────────

@dataclass(frozen=True)
class Template:
    """One turn is `prompt` (masked) then `response` and the end token (trained on), then
    `turn_end` (masked); turns follow each other. Placeholders: {instruction} {input} {output},
    and {system}: the first prompt's {system} slot receives `system` (itself holding the text as
    {system}) when the record has a system message, else nothing. `<|...|>` markers are special
    tokens, never encoded as text."""
    name: str
    prompt: str                   # one turn's prompt, up to where the answer starts (the generation prompt)
    response: str = "{output}"
    system: str = "{system}\n\n"
    prompt_with_input: str = ""   # Alpaca: used when "input" is not empty; otherwise input joins the instruction
    end_token: str = ""           # "" = the tokenizer's EOS; else a special token such as "<|eot_id|>"
    turn_end: str = ""            # text after the end token, not trained on (ChatML's "\n")
    bos: bool = True              # start with BOS (if the tokenizer uses one); ChatML has none
    bos_every_turn: bool = False  # Llama-2 chat opens every [INST] with BOS
    strip: bool = False           # Meta's chat formats strip the whitespace around every message
    empty_system_block: bool = True  # an explicit "" system message still gets its block, as the
    #                                  official template writes it (alpaca and none have no official one)
    default_system: bool = False  # no system message: write the model's default (see default_system_prompt)


PROMPT_DICT = {  # Stanford Alpaca's train.py, verbatim
    "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}
TEMPLATES = {t.name: t for t in [
    # Multi-turn records (Alpaca "history", chat) with alpaca or none: each turn is written the same
    # way, one after another (as LLaMA-Factory does), so later answers see the earlier turns.
    Template("alpaca", prompt="{system}" + PROMPT_DICT["prompt_no_input"],
             prompt_with_input="{system}" + PROMPT_DICT["prompt_input"], empty_system_block=False),
    # Meta's llama/generation.py: per turn BOS + encode(f"[INST] {user} [/INST] {answer} ") + EOS.
    Template("llama2-chat", prompt="[INST] {system}{instruction} [/INST]", response=" {output} ",
             system="<<SYS>>\n{system}\n<</SYS>>\n\n", bos_every_turn=True, strip=True),
    # Meta's llama3/tokenizer.py ChatFormat; BOS is <|begin_of_text|>.
    Template("llama3-chat", prompt="{system}<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
                                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
             system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
             end_token="<|eot_id|>", strip=True),
    # ChatML (SmolLM2, Qwen, ...): the model's own chat_template, with its default system prompt.
    Template("chatml", prompt="{system}<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
             system="<|im_start|>system\n{system}<|im_end|>\n", end_token="<|im_end|>", turn_end="\n",
             bos=False, default_system=True),
    Template("none", prompt="{system}{instruction}", empty_system_block=False),  # raw text: prompt, then answer
]}
SPECIAL_TOKEN = re.compile(r"(<\|[a-z0-9_]+\|>)")
# The default system prompt inside a ChatML chat_template: the literal text of its system block,
# e.g. SmolLM2's '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>'.
# The newline is a real one or jinja's "\n"; the text holds no quotes or braces (not an expression).
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")


def default_system_prompt(tokenizer: Tokenizer) -> str | None:
    """The system prompt the model's own chat template writes when a conversation has none."""
    match = CHATML_DEFAULT_SYSTEM.search(getattr(tokenizer, "chat_template", None) or "")
    return match.group(1).replace("\\n", "\n") if match else None


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# ── Tokenizing ───────────────────────────────────────────────────────────────────────────────────

def encode_text(text: str, tokenizer: Tokenizer, continuation: bool = False) -> list[int]:
    """Ids of `text`; with continuation=True, as the text is tokenized when it follows earlier
    text, without SentencePiece's "▁" prefix (see the top of this file)."""
    if not continuation or not isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.encode(text)
    anchor = tokenizer.encode("\n")
    ids = tokenizer.encode("\n" + text)
    if ids[:len(anchor)] != anchor:
        raise UserError(f"tokenizer {tokenizer.path}: '\\n' merges with the text after it, so an answer cannot "
                        "be tokenized as the prompt's continuation (LLaMA vocabularies encode '\\n' as a byte)")
    return ids[len(anchor):]


def _encode_format(fmt: str, fields: dict, tokenizer: Tokenizer, continuation: bool = False) -> list[int]:
    """A template string with its fields filled in → ids. Special-token markers are split off before
    the fields go in, so a "<|eot_id|>" typed inside user data stays plain text."""
    ids = []
    for part in SPECIAL_TOKEN.split(fmt):
        if SPECIAL_TOKEN.fullmatch(part):
            ids.append(tokenizer.special_id(part))
        elif part and (text := part.format(**fields)):
            ids += encode_text(text, tokenizer, continuation)
    return ids


def tokenize_conversation(record: dict, tokenizer: Tokenizer, template: Template, prompt_only: bool = False):
    """(ids, is_response): the whole conversation, and which ids are answer or end tokens.
    prompt_only stops before the last answer: the ids a model gets to generate that answer."""
    conv = record if "turns" in record else normalize_record(record)
    end_id = tokenizer.special_id(template.end_token) if template.end_token else tokenizer.eos_id
    clean = str.strip if template.strip else str
    system = conv.get("system")
    if system is None and template.default_system:
        system = default_system_prompt(tokenizer)
    has_system = system is not None if template.empty_system_block else bool(system)
    bos = template.bos and getattr(tokenizer, "add_bos", True)
    ids, is_response = [], []
    for i, turn in enumerate(conv["turns"]):
        instruction, extra = clean(turn["instruction"]), clean(turn["input"])
        fmt = template.prompt_with_input if extra and template.prompt_with_input else template.prompt
        if extra and not template.prompt_with_input:
            instruction = f"{instruction}\n\n{extra}"
        fmt = fmt.replace("{system}", template.system if i == 0 and has_system else "")
        fields = {"system": clean(system or ""), "instruction": instruction, "input": extra}
        prompt = _encode_format(fmt, fields, tokenizer)
        if bos and (i == 0 or template.bos_every_turn):
            prompt.insert(0, tokenizer.bos_id)
        ids += prompt
        is_response += [False] * len(prompt)
        if prompt_only and i == len(conv["turns"]) - 1:
            break
        answer = _encode_format(template.response, {"output": clean(turn["output"])}, tokenizer, continuation=True)
        ids += answer + [end_id]
        is_response += [True] * (len(answer) + 1)
        if template.turn_end:
            after = _encode_format(template.turn_end, {}, tokenizer)
            ids += after
            is_response += [False] * len(after)
    return ids, is_response


def _finish(ids, is_response, max_seq_len: int, train_on_prompt: bool):
    """Truncate (the end goes) and build the labels; None when no target token is left."""
    ids, is_response = ids[:max_seq_len], is_response[:max_seq_len]
    labels = [t if train_on_prompt or r else IGNORE_INDEX for t, r in zip(ids, is_response)]
    labels[0] = IGNORE_INDEX  # BOS is never a target (see the top of this file)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


def encode_example(record: dict, tokenizer: Tokenizer, template: Template, max_seq_len: int,
                   train_on_prompt: bool = False) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one record, or None when even the first answer token does not fit."""
    ids, is_response = tokenize_conversation(record, tokenizer, template)
    return _finish(ids, is_response, max_seq_len, train_on_prompt)


def encode_prompt(text_or_record, tokenizer: Tokenizer, template: Template) -> list[int]:
    """The ids to generate from: BOS, the templated prompt, the generation prompt (e.g. Llama-3's
    assistant header). A string is one instruction; a record gives everything before its last answer."""
    record = text_or_record
    if isinstance(record, str):
        record = {"system": None, "turns": [{"instruction": record, "input": "", "output": ""}]}
    return tokenize_conversation(record, tokenizer, template, prompt_only=True)[0]


def percentile(sorted_values: list, p: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default definition)."""
    x = (len(sorted_values) - 1) * p / 100
    lo = int(x)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (x - lo)


def encode_dataset(records: list[dict], tokenizer: Tokenizer, template: Template, max_seq_len: int,
                   train_on_prompt: bool = False, progress: bool = True, source: str = "data"):
    """Encode every record → (examples, stats). Length statistics are before truncation (to help
    choose --seq-len); tokens and target_tokens count what is trained on, after it."""
    if not records:
        raise UserError(f"{source}: no records")
    examples, lengths, truncated = [], [], 0
    if progress and len(records) >= 5000:
        from tqdm import tqdm
        records = tqdm(records, desc="tokenizing", unit=" records", file=sys.stderr)
    for record in records:
        ids, is_response = tokenize_conversation(record, tokenizer, template)
        lengths.append(len(ids))
        example = _finish(ids, is_response, max_seq_len, train_on_prompt)
        if example is not None:
            examples.append(example)
            truncated += len(ids) > max_seq_len
    if not examples:
        raise UserError(f"{source}: all {len(lengths)} examples are longer than --seq-len {max_seq_len}: no answer "
                        f"token fits after its prompt (the shortest example has {min(lengths)} tokens)")
    lengths.sort()
    return examples, {
        "records": len(lengths), "kept": len(examples), "truncated": truncated,
        "dropped": len(lengths) - len(examples), "tokens": sum(len(ids) for ids, _ in examples),
        "target_tokens": sum(label != IGNORE_INDEX for _, labels in examples for label in labels),
        "min": lengths[0], "p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": lengths[-1]}


def split_train_val(records: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A random but reproducible split; both parts keep the file's order."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-split must be in [0, 1), got {val_fraction}")
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = min(max(n_val, 1), len(records) - 1)
    is_val = set(random.Random(seed).sample(range(len(records)), n_val))
    return [r for i, r in enumerate(records) if i not in is_val], [r for i, r in enumerate(records) if i in is_val]


# ── CLI: look at what the model will be trained on ───────────────────────────────────────────────

def format_example(ids: list[int], labels: list[int], tokenizer: Tokenizer, color: bool = False) -> str:
    """The decoded example with its targets marked: green on a terminal, else [[...]]."""
    named = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}  # SentencePiece decodes these to ""
    target = [label != IGNORE_INDEX for label in labels]
    spans, start = [], 0  # [is_target, text] for each run of masked or of trained-on tokens
    for end in range(1, len(ids) + 1):
        if end < len(ids) and target[end] == target[start] and ids[end] not in named and ids[end - 1] not in named:
            continue
        # decode from the start each time: a span decoded alone loses SentencePiece's leading space
        text = tokenizer.decode(ids[:end])[len(tokenizer.decode(ids[:start])):] or named.get(ids[start], "")
        if spans and spans[-1][0] == target[start]:
            spans[-1][1] += text
        else:
            spans.append([target[start], text])
        start = end
    mark = (lambda text: f"\033[32m{text}\033[0m") if color else (lambda text: f"[[{text}]]")
    return "".join(mark(text) if is_target else text for is_target, text in spans)


def main(argv=None):
    p = argparse.ArgumentParser(description="Show what a data file becomes: encoded examples with the trained-on "
                                "tokens marked, then token and padding statistics.", epilog=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Alpaca or chat records: a JSON array or JSON Lines")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (or a checkpoint directory holding one)")
    p.add_argument("--template", default="alpaca", help=f"prompt format: {', '.join(TEMPLATES)} (default alpaca)")
    p.add_argument("--seq-len", type=int, default=512, help="longer examples are truncated (default 512)")
    p.add_argument("--show", type=int, default=3, help="how many encoded examples to print (default 3)")
    p.add_argument("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    p.add_argument("--batch-size", type=int, default=8, help="for the padding statistics (default 8)")
    args = p.parse_args(argv)

    template = get_template(args.template)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    records = load_records(args.data)
    examples, s = encode_dataset(records, tokenizer, template, args.seq_len, args.train_on_prompt, source=args.data)
    color = sys.stdout.isatty()
    for n, (ids, labels) in enumerate(examples[:args.show], 1):
        n_target = sum(label != IGNORE_INDEX for label in labels)
        print(f"── example {n}: {len(ids)} tokens, {n_target} trained on "
              f"({'green' if color else 'in [[ ]]'}) ──\n{format_example(ids, labels, tokenizer, color)}\n")
    print(f"records {s['records']}: kept {s['kept']} ({s['truncated']} truncated to {args.seq_len} tokens), "
          f"dropped {s['dropped']} (prompt alone fills --seq-len)")
    print(f"tokens {s['tokens']}, trained on {s['target_tokens']} ({s['target_tokens'] / s['tokens']:.0%})")
    print(f"length before truncation: min {s['min']}, median {s['p50']:.0f}, p95 {s['p95']:.0f}, max {s['max']}")
    for name, options in [("random batches", dict(group_by_length=False)), ("grouped by length", {}),
                          ("packed", dict(packing=True))]:
        batches = make_batches(examples, args.batch_size, pad_id=tokenizer.eos_id, max_seq_len=args.seq_len, **options)
        print(f"padding efficiency at batch size {args.batch_size}, {name}: {batch_efficiency(batches):.1%}")


if __name__ == "__main__":
    run_cli(main)
