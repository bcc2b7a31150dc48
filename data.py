r"""Instruction data → token ids with a loss mask → batches.

    alpaca.json / chat.jsonl
      ─► records.load_records
      ─► {"system": str | None, "turns": [{"instruction", "input", "output"}, ...]}
      ─► encode_example (a Template, or the model's own chat template: chat_template.py,
                         writes the turns out) ─► (input_ids, labels)
      ─► batching.make_batches (pad + group by length, or pack)
      ─► {"tokens", "labels", "positions", "doc_ids", "lengths"}

    python data.py --data examples/alpaca_demo.json --tokenizer $M --show 2   # M: a model
    python data.py --stats sharegpt.parquet --checkpoint $M --seq-len 1024     # numbers only

This file reads top to bottom: one example and its loss mask (encode_example, with a worked
example), then what it stands on (choosing a template, tokenizing a conversation), then a whole
data set, then the command line. Reading and checking data files is records.py; the named
templates are templates.py; batches are batching.py.

What is trained on. `labels` line up with `input_ids` (Hugging Face's convention; model.loss shifts
them by one, so position t learns to predict labels[t+1]). labels[t] = input_ids[t] where token t
is a target and IGNORE_INDEX where it is not. Targets are every assistant answer plus its
end-of-turn token (EOS, or <|eot_id|> for Llama-3), so the model learns to stop; system text,
prompts and padding are masked. labels[0] (BOS) is never a target: in a packed row the token
before it is the previous example's last one, which must not learn to predict the start of an
unrelated example.

How the loss is normalised (train_sft.py does it): the summed token loss of the whole accumulated
batch divided by the number of target tokens in it, a mean over target tokens, not a mean of
per-example means. Every target token then counts the same. A mean of per-example means would give
the two tokens of "Paris." the weight of a 300-token essay, and its value would change with how the
examples happen to be split into micro-batches, so gradient accumulation would differ from one
big batch.

Exact prompt/answer boundary. The masked prompt must be exactly what generation sees,
encode_prompt(), so it is tokenized on its own. The answer must continue it as one text would:
SentencePiece (Llama-2) puts a "▁" (space) before the first word of every separately encoded
string, so encode("Paris") is "▁Paris", while after "### Response:\n" the text "Paris" is
tokenized without it. `encode_text(..., continuation=True)` encodes "\n" + answer and drops the
ids of "\n": newlines are byte tokens in every LLaMA SentencePiece vocabulary and never merge, so
what follows is tokenized as it is in the full text. Llama-3's tiktoken adds no prefix, and Meta's
own chat format encodes each piece separately.
"""
import re
import sys

from batching import batch_efficiency, make_batches
from chat_template import ChatTemplate, default_system_prompt, tokenize_chat
from errors import ArgumentParser, UserError, non_negative_int, positive_int, run_cli
from model import IGNORE_INDEX
from records import columns_flag, load_records, normalize_record, parse_columns
from templates import TEMPLATES, Template, get_template
from tokenizer import ByteTokenizer, Tokenizer, checkpoint_tokenizer, encode_text

# -- One example: the prompt is masked, the answer and its end token are trained on ---------------

def encode_example(record: dict, tokenizer: Tokenizer, template: "Template", max_seq_len: int,
                   train_on_prompt: bool = False,
                   train_on: str = "all") -> tuple[list[int], list[int]] | None:
    r"""(input_ids, labels) of one record, or None when even the first answer token does not fit.

    The simplest case: one Alpaca record, Stanford Alpaca's prompt, the Llama-2 tokenizer
    (tests/test_data.py runs these lines, so the ids are the real ones):

    >>> tok = Tokenizer.from_file("tests/fixtures/models/llama2-tokenizer/tokenizer.model")
    >>> record = {"instruction": "Name the capital of France.", "output": "Paris."}
    >>> ids, labels = encode_example(record, tok, TEMPLATES["alpaca"], max_seq_len=512)
    >>> ids     # BOS, "Below is an instruction ... ### Response:\n", then "Par" "is" "." and EOS
    [1, 13866, 338, 385, 15278, ..., 13291, 29901, 13, 2177, 275, 29889, 2]
    >>> labels  # the prompt masked; the answer and EOS are targets, so the model learns to stop
    [-100, -100, -100, -100, -100, ..., -100, -100, -100, 2177, 275, 29889, 2]
    >>> prompt = encode_prompt(record, tok, TEMPLATES["alpaca"])  # what generation will see
    >>> labels == [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]  # exactly the prompt is masked
    True

    tokenize_conversation writes the record out with its template and flags the ids of every
    answer and its end token (each turn's, in a multi-turn record); truncate_and_mask turns the
    flags into labels.
    """
    ids, is_answer = tokenize_conversation(record, tokenizer, template)
    return truncate_and_mask(ids, is_answer, max_seq_len, train_on_prompt, train_on)


TRAIN_ON = ("all", "last")  # --train-on: every assistant turn, or only the last


def truncate_and_mask(ids: list[int], is_answer: list[bool], max_seq_len: int,
                      train_on_prompt: bool = False,
                      train_on: str = "all") -> tuple[list[int], list[int]] | None:
    """The loss mask: labels[t] is ids[t] where token t is an answer or end token, IGNORE_INDEX
    elsewhere. train_on "last": only the last answer's (its tokens are the last run of answer
    flags: a prompt always stands between two answers). Truncation cuts the end off; None when
    no target token is left."""
    if train_on == "last":
        is_answer = last_answer(is_answer)
    ids = ids[:max_seq_len]
    is_answer = is_answer[:max_seq_len]
    labels = []
    for token, answer in zip(ids, is_answer):
        if answer or train_on_prompt:
            labels.append(token)
        else:
            labels.append(IGNORE_INDEX)
    labels[0] = IGNORE_INDEX  # BOS is never a target (see the top of this file)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return ids, labels


def last_answer(is_answer: list[bool]) -> list[bool]:
    """The flags of the last run of True only: the conversation's last answer and its end token."""
    end = max((t + 1 for t, answer in enumerate(is_answer) if answer), default=0)
    start = end
    while start > 0 and is_answer[start - 1]:
        start -= 1
    return [start <= t < end for t in range(len(is_answer))]


def encode_prompt(text_or_record, tokenizer: Tokenizer, template: "Template") -> list[int]:
    """The ids to generate from: BOS, the templated prompt, the generation prompt (e.g. Llama-3's
    assistant header). A string is one instruction; a record gives everything before its last
    answer."""
    record = text_or_record
    if isinstance(record, str):
        record = {"system": None, "turns": [{"instruction": record, "input": "", "output": ""}]}
    ids, _ = tokenize_conversation(record, tokenizer, template, prompt_only=True)
    return ids


# -- Resolving a template against the model's own -----------------------------------------------

def resolve_template(name: str, tokenizer: Tokenizer, fallback: str = "alpaca",
                     say=print) -> "Template | ChatTemplate":
    """--template → what writes conversations out, said in one line. auto: the model's own chat
    template (tokenizer.chat_template), else the named `fallback` (a model without one). A named
    template wins, with a warning when it writes conversations other than the model's own."""
    own = None
    if tokenizer.chat_template:
        own = ChatTemplate(tokenizer.chat_template, f"the chat template of {tokenizer.path.name}")
    if name == "auto" and own:
        say(f"template: {own.name} (--template auto)")
        return own
    if name == "auto":
        say(f"template: {fallback} (--template auto: {tokenizer.path.name} has no chat template)")
        return get_template(fallback)
    template = get_template(name)
    if own and not same_format(template, own, tokenizer):
        say(f"warning: --template {template.name} writes conversations other than "
            f"{own.name} does; a model answers best in the format it was tuned with")
    return template


def template_spec(template: "Template | ChatTemplate") -> str:
    """What config.json records: a template's name, or a jinja template's source."""
    return template.source if isinstance(template, ChatTemplate) else template.name


def jinja_form(template: "Template | ChatTemplate", tokenizer: Tokenizer) -> str | None:
    """A template as jinja, for exported tokenizer files: a chat template's source; for a named
    template the model's own when the two write the same (chatml on SmolLM2), else None."""
    if isinstance(template, ChatTemplate):
        return template.source
    own = tokenizer.chat_template
    if own and same_format(template, ChatTemplate(own), tokenizer):
        return own
    return None


def same_format(one, other, tokenizer: Tokenizer) -> bool:
    """Whether two templates give the same ids and loss mask to a two-turn conversation."""
    probe = {"system": None, "turns": [{"instruction": "Hi!", "input": "", "output": "Hello."},
                                       {"instruction": "Name a color.", "input": "",
                                        "output": "Blue."}]}
    try:
        return (tokenize_conversation(probe, tokenizer, one)
                == tokenize_conversation(probe, tokenizer, other))
    except UserError:
        return False


# -- Tokenizing a conversation --------------------------------------------------------------------

SPECIAL_TOKEN = re.compile(r"(<\|[a-z0-9_]+\|>)")


def _encode_format(text_format: str, fields: dict, tokenizer: Tokenizer,
                   continuation: bool = False) -> list[int]:
    """A template string with its fields filled in → ids. Special-token markers are split off
    before the fields go in, so a "<|eot_id|>" typed inside user data stays plain text."""
    ids = []
    for part in SPECIAL_TOKEN.split(text_format):
        if SPECIAL_TOKEN.fullmatch(part):
            ids.append(tokenizer.special_id(part))
        elif part and (text := part.format(**fields)):
            ids += encode_text(text, tokenizer, continuation)
    return ids


def tokenize_conversation(record: dict, tokenizer: Tokenizer, template: "Template | ChatTemplate",
                          prompt_only: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, is_answer): the whole conversation, and which ids are answer or end tokens.
    prompt_only stops before the last answer: the ids a model gets to generate that answer."""
    conversation = record if "turns" in record else normalize_record(record)
    if isinstance(template, ChatTemplate):
        return tokenize_chat(conversation, tokenizer, template, prompt_only)
    end_id = tokenizer.eos_id
    if template.end_token:
        end_id = tokenizer.special_id(template.end_token)
    clean = str.strip if template.strip else str
    system = conversation.get("system")
    if system is None and template.default_system:
        system = default_system_prompt(tokenizer)
    if template.empty_system_block:
        has_system = system is not None  # "" is an explicit empty system message: a block
    else:
        has_system = bool(system)
    bos = template.bos and getattr(tokenizer, "add_bos", True)
    last_turn = len(conversation["turns"]) - 1
    ids, is_answer = [], []
    for turn_index, turn in enumerate(conversation["turns"]):
        instruction = clean(turn["instruction"])
        input_text = clean(turn["input"])
        prompt_format = template.prompt
        if input_text and template.prompt_with_input:
            prompt_format = template.prompt_with_input
        elif input_text:  # the template has no place for an input: it joins the instruction
            instruction = f"{instruction}\n\n{input_text}"
        system_block = ""
        if turn_index == 0 and has_system:
            system_block = template.system
        prompt_format = prompt_format.replace("{system}", system_block)
        fields = {"system": clean(system or ""), "instruction": instruction, "input": input_text}
        prompt = _encode_format(prompt_format, fields, tokenizer)
        if bos and (turn_index == 0 or template.bos_every_turn):
            prompt.insert(0, tokenizer.bos_id)
        ids += prompt
        is_answer += [False] * len(prompt)
        if prompt_only and turn_index == last_turn:
            break
        answer = _encode_format(template.response, {"output": clean(turn["output"])}, tokenizer,
                                continuation=True)
        ids += answer + [end_id]
        is_answer += [True] * (len(answer) + 1)
        if template.turn_end:
            after = _encode_format(template.turn_end, {}, tokenizer)
            ids += after
            is_answer += [False] * len(after)
    return ids, is_answer


# -- A whole data set -----------------------------------------------------------------------------

def percentile(sorted_values: list, p: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default definition)."""
    rank = (len(sorted_values) - 1) * p / 100
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def encode_dataset(records: list[dict], tokenizer: Tokenizer, template: Template, max_seq_len: int,
                   train_on_prompt: bool = False, progress: bool = True, source: str = "data",
                   train_on: str = "all"):
    """Encode every record → (examples, stats). Length statistics are before truncation (to help
    choose --seq-len); tokens and target_tokens count what is trained on, after it."""
    if not records:
        raise UserError(f"{source}: no records")
    examples, lengths, truncated = [], [], 0
    if progress and len(records) >= 5000:
        from tqdm import tqdm
        records = tqdm(records, desc="tokenizing", unit=" records", file=sys.stderr)
    for record in records:
        try:
            ids, is_answer = tokenize_conversation(record, tokenizer, template)
        except UserError as e:
            first = record["turns"][0]["instruction"] if "turns" in record else record
            raise UserError(f"{source}: the record that starts {str(first)[:40]!r}: {e}") from None
        lengths.append(len(ids))
        example = truncate_and_mask(ids, is_answer, max_seq_len, train_on_prompt, train_on)
        if example is not None:
            examples.append(example)
            truncated += len(ids) > max_seq_len
    if not examples:
        raise UserError(f"{source}: all {len(lengths)} examples are longer than --seq-len "
                        f"{max_seq_len}: no answer token fits after its prompt (the shortest "
                        f"example has {min(lengths)} tokens)")
    lengths.sort()
    target_tokens = sum(label != IGNORE_INDEX for _, labels in examples for label in labels)
    return examples, {
        "records": len(lengths), "kept": len(examples), "truncated": truncated,
        "dropped": len(lengths) - len(examples), "tokens": sum(len(ids) for ids, _ in examples),
        "target_tokens": target_tokens,
        "min": lengths[0], "p50": percentile(lengths, 50), "p95": percentile(lengths, 95),
        "max": lengths[-1]}


# -- CLI: look at what the model will be trained on -----------------------------------------------

def format_example(ids: list[int], labels: list[int], tokenizer: Tokenizer,
                   color: bool = False) -> str:
    """The decoded example with its targets marked: green on a terminal, else [[...]]."""
    named = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}  # SentencePiece decodes them to ""
    target = [label != IGNORE_INDEX for label in labels]
    spans, start = [], 0  # [is_target, text] for each run of masked or of trained-on tokens
    for end in range(1, len(ids) + 1):
        same_run = end < len(ids) and target[end] == target[start]
        if same_run and ids[end] not in named and ids[end - 1] not in named:
            continue
        # decode from the start each time: a span decoded alone loses SentencePiece's leading space
        decoded = tokenizer.decode(ids[:end])[len(tokenizer.decode(ids[:start])):]
        text = decoded or named.get(ids[start], "")
        if spans and spans[-1][0] == target[start]:
            spans[-1][1] += text
        else:
            spans.append([target[start], text])
        start = end
    return "".join(_mark_target(text, color) if is_target else text for is_target, text in spans)


def _mark_target(text: str, color: bool) -> str:
    if color:
        return f"\033[32m{text}\033[0m"
    return f"[[{text}]]"


def main(argv=None):
    parser = ArgumentParser(description="Show what a data file becomes: encoded examples with the "
                            "trained-on tokens marked, then token and padding statistics; or, "
                            "with --stats, the statistics alone.",
                            epilog=__doc__.split("\n\n")[2])
    add = parser.add_argument
    add("--data", help="records (Alpaca, ShareGPT, Dolly, prompt/completion or chat messages): "
        "JSON, JSON Lines, CSV, TSV, Parquet, or a folder of them (this or --stats)")
    add("--stats", metavar="FILE", help="only the statistics of FILE (records, turns, token "
        "lengths, truncation, trained tokens), instead of --data")
    add("--columns", type=columns_flag,
        help="their keys as ours, e.g. output=answer,instruction=question (default: none)")
    add("--tokenizer", help="tokenizer.model, tokenizer.json or a directory holding one "
        "(default: the one next to --checkpoint)")
    add("--checkpoint", help="a model whose tokenizer to use (this or --tokenizer, which wins); "
        "'tiny': the demo's byte tokenizer")
    add("--template", default="auto", choices=["auto", *TEMPLATES],
        help="prompt format; auto: the tokenizer's own chat template, else alpaca")
    add("--seq-len", type=positive_int, default=512, help="longer examples are truncated")
    add("--show", type=non_negative_int, default=3, help="how many encoded examples to print")
    add("--train-on-prompt", action="store_true", help="also train on prompt tokens")
    add("--train-on", choices=TRAIN_ON, default="all",
        help="in multi-turn records, train on every assistant turn or only the last")
    add("--batch-size", type=positive_int, default=8, help="for the padding statistics")
    args = parser.parse_args(argv)
    if (args.data is None) == (args.stats is None):
        raise UserError("give --data (examples and statistics) or --stats FILE (statistics), one "
                        "of them")
    if args.tokenizer is None and args.checkpoint is None:
        raise UserError("give --tokenizer or --checkpoint (whose tokenizer is then used)")
    check_train_on(args.train_on, args.train_on_prompt)
    tokenizer = ByteTokenizer() if args.checkpoint == "tiny" and not args.tokenizer else \
        checkpoint_tokenizer(args.checkpoint, args.tokenizer)
    path = args.data or args.stats
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731  (stdout: what the data becomes)
    columns = parse_columns(args.columns) if args.columns else None
    read = []  # (said after the template: a mistake in the data is the only line)
    records = load_records(path, columns, say=read.append)
    template = resolve_template(args.template, tokenizer, say=say)
    for line in read:
        say(line)
    examples, stats = encode_dataset(records, tokenizer, template, args.seq_len,
                                     args.train_on_prompt, source=path, train_on=args.train_on)
    color = sys.stdout.isatty()
    how_marked = "green" if color else "in [[ ]]"
    for number, (ids, labels) in enumerate(examples[:args.show if args.data else 0], 1):
        n_target = sum(label != IGNORE_INDEX for label in labels)
        heading = f"example {number}: {len(ids)} tokens, {n_target} trained on ({how_marked})"
        print(f"── {heading} ──")
        print(format_example(ids, labels, tokenizer, color) + "\n")
    turns = sum(len(record["turns"]) for record in records)
    print(f"records {stats['records']} ({turns} turns): kept {stats['kept']} "
          f"({stats['truncated']} truncated to {args.seq_len} tokens), dropped {stats['dropped']} "
          "(prompt alone fills --seq-len)")
    share = stats["target_tokens"] / stats["tokens"]
    print(f"tokens {stats['tokens']}, trained on {stats['target_tokens']} ({share:.0%}; "
          f"--train-on {args.train_on}{', --train-on-prompt' if args.train_on_prompt else ''})")
    print(f"length before truncation: min {stats['min']}, median {stats['p50']:.0f}, "
          f"p95 {stats['p95']:.0f}, max {stats['max']}")
    if args.stats:
        return
    layouts = [("random batches", {"group_by_length": False}), ("grouped by length", {}),
               ("packed", {"packing": True})]
    for name, options in layouts:
        batches = make_batches(examples, args.batch_size, pad_id=tokenizer.eos_id,
                               max_seq_len=args.seq_len, **options)
        efficiency = batch_efficiency(batches)
        print(f"padding efficiency at batch size {args.batch_size}, {name}: {efficiency:.1%}")


def check_train_on(train_on: str, train_on_prompt: bool):
    """--train-on last trains one turn's answer; --train-on-prompt trains every token."""
    if train_on == "last" and train_on_prompt:
        raise UserError("--train-on last and --train-on-prompt contradict each other: the "
                        "prompt is every token before the last answer; give one of them")


if __name__ == "__main__":
    run_cli(main)
