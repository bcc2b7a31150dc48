"""records.py, data.py and batching.py: records, templates, the loss mask, batches. Real
tokenizers and data from tests/fixtures."""
import doctest
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, shared_path
import data
from batching import batch_efficiency, make_batches
from chat_template import default_system_prompt
from data import (encode_dataset, encode_example, encode_prompt,
                  format_example, get_template, main, percentile)
from errors import UserError
from model import IGNORE_INDEX, ModelConfig, Transformer
from records import load_records, split_train_val
from templates import PROMPT_DICT, TEMPLATES
from tokenizer import ByteTokenizer

ALPACA = TEMPLATES["alpaca"]
# chatml needs <|im_start|>: see below
LLAMA_TEMPLATES = [name for name in TEMPLATES if name != "chatml"]


def split(ids, labels):
    """(prompt ids, target ids) of a single-turn example: the masked head and the trained tail."""
    n_masked = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label != IGNORE_INDEX for label in labels[n_masked:])
    assert labels[n_masked:] == ids[n_masked:]
    return ids[:n_masked], ids[n_masked:]


# ── Templates and the mask ──────────────────────

def test_the_worked_example_at_the_top_of_data_py_is_real(monkeypatch):
    """encode_example's docstring shows one Alpaca record's real ids and labels: run it, so that
    the lesson a reader meets first can never drift from the code."""
    tokenizer = shared_path("models", "llama2-tokenizer", "tokenizer.model")
    monkeypatch.chdir(ROOT)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = []
    attempted = 0
    for test in doctest.DocTestFinder().find(data):
        for example in test.examples:  # the example names the tokenizer from the root
            example.source = example.source.replace(
                "tests/fixtures/models/llama2-tokenizer/tokenizer.model", str(tokenizer))
        failed, tried = runner.run(test, out=report.append)
        assert failed == 0, "".join(report)
        attempted += tried
    assert attempted >= 7


def test_alpaca_template_is_stanford_text():
    assert PROMPT_DICT["prompt_input"] == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    assert PROMPT_DICT["prompt_no_input"] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


RECORDS = [{"instruction": "Name the capital of France.", "input": "",
            "output": "Paris is the capital.\nIt is big!"},
           {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42"}]


def expected_text(template, record):
    """The prompt and answer text each template should produce, written out by hand."""
    instruction, extra, output = record["instruction"], record["input"], record["output"]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    if template == "alpaca":
        return PROMPT_DICT["prompt_input" if extra else "prompt_no_input"].format(**record), output
    if template == "llama2-chat":
        return f"[INST] {user} [/INST]", f" {output} "
    if template == "llama3-chat":
        return (f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n", output)
    return user, output


@pytest.mark.parametrize("tokenizer_name", ["llama2", "llama3"])
@pytest.mark.parametrize("template", LLAMA_TEMPLATES)
@pytest.mark.parametrize("record", RECORDS)
def test_targets_decode_to_the_answer_and_prompt_to_the_prompt(template, tokenizer_name, record,
                                                               request):
    tok = request.getfixturevalue(tokenizer_name)
    if template == "llama3-chat" and tokenizer_name == "llama2":
        with pytest.raises(UserError, match="no special token"):
            encode_example(record, tok, TEMPLATES[template], 512)
        return
    ids, labels = encode_example(record, tok, TEMPLATES[template], 512)
    prompt_ids, target_ids = split(ids, labels)
    prompt_text, answer_text = expected_text(template, record)
    end_id = tok.special_id("<|eot_id|>") if template == "llama3-chat" else tok.eos_id
    assert prompt_ids[0] == tok.bos_id and target_ids[-1] == end_id
    assert prompt_ids == encode_prompt(record, tok, TEMPLATES[template])
    # SentencePiece decodes BOS to ""
    bos_text = "<|begin_of_text|>" if tokenizer_name == "llama3" else ""
    assert tok.decode(prompt_ids) == bos_text + prompt_text
    # nothing added or lost
    assert tok.decode(prompt_ids + target_ids[:-1]) == bos_text + prompt_text + answer_text
    if tokenizer_name == "llama2" and answer_text.startswith(" "):
        # SentencePiece's decode drops the leading space of its first piece
        answer_text = answer_text[1:]
    assert tok.decode(target_ids[:-1]) == answer_text


def test_encode_prompt_of_a_string_is_the_generation_prompt(llama2, llama3):
    # the Llama-3 generation prompt in tests/fixtures/README.md, computed from Meta's format
    assert encode_prompt("Hello world", llama3, TEMPLATES["llama3-chat"]) == \
        [128000, 128006, 882, 128007, 271, 9906, 1917, 128009, 128006, 78191, 128007, 271]
    assert encode_prompt("Hello world", llama2, TEMPLATES["none"]) == [1, 15043, 3186]
    ids = encode_prompt("Hello world", llama2, ALPACA)
    assert ids == llama2.encode(PROMPT_DICT["prompt_no_input"].format(instruction="Hello world"),
                                bos=True)
    # the prompt is one string: "\n\n### Response:\n" inside it has no "▁" (29871) in front,
    # unlike the same text encoded alone (README: [29871, 13, 13, 2277, 29937, 13291, 29901, 13])
    assert ids[-7:] == [13, 13, 2277, 29937, 13291, 29901, 13]


def test_naive_separate_tokenization_adds_a_space_ours_is_exact(llama2):
    """encode(prompt) + encode(answer) gives the answer SentencePiece's "▁" prefix: the model
    would learn "### Response:\n 40", a space after the newline that is not in the data, and
    "▁Love" where the text has "Love". Ours equals tokenizing the whole text at once (as Stanford
    Alpaca's train.py does), and its prompt part is still exactly encode_prompt()."""
    for output, naive_pieces, our_pieces in [("40", ["▁", "4", "0"], ["4", "0"]),
                                             ("Love is", ["▁Love", "▁is"],
                                              ["L", "ove", "▁is"])]:
        record = {"instruction": "Say something.", "input": "", "output": output}
        prompt = PROMPT_DICT["prompt_no_input"].format(**record)
        naive = llama2.encode(prompt, bos=True) + llama2.encode(output, eos=True)
        ids, labels = encode_example(record, llama2, ALPACA, 512)
        prompt_ids, target_ids = split(ids, labels)
        assert prompt_ids == llama2.encode(prompt, bos=True) == \
            encode_prompt(record, llama2, ALPACA)
        assert [llama2.sp.id_to_piece(i) for i in naive[len(prompt_ids):-1]] == naive_pieces
        assert [llama2.sp.id_to_piece(i) for i in target_ids[:-1]] == our_pieces
        assert ids == llama2.encode(prompt + output, bos=True, eos=True)  # the whole text at once
        assert llama2.decode(ids) == prompt + output
        assert llama2.decode(naive) == prompt + " " + output


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": " Hi! "},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"}]}


def test_llama3_chat_two_turns_token_for_token(llama3):
    ids, labels = encode_example(CONVERSATION, llama3, TEMPLATES["llama3-chat"], 512)
    # <|begin_of_text|>=128000 <|start_header_id|>=128006 <|end_header_id|>=128007 <|eot_id|>=128009
    # "system"=9125 "user"=882 "assistant"=78191 "\n\n"=271 "Be"=3513 " brief"=10015 "."=13
    # "Hello"=9906 " world"=1917 "Hi"=13347 "!"=0 "2"=17 "+"=10 "?"=30 "4"=19
    # (contents are stripped)
    assert ids == [128000,
                   128006, 9125, 128007, 271, 3513, 10015, 13, 128009,
                   128006, 882, 128007, 271, 9906, 1917, 128009,
                   128006, 78191, 128007, 271, 13347, 0, 128009,
                   128006, 882, 128007, 271, 17, 10, 17, 30, 128009,
                   128006, 78191, 128007, 271, 19, 128009]
    # the README's reference prefix for user "Hello world", once the system block is taken out
    assert ids[:1] + ids[9:20] == [128000, 128006, 882, 128007, 271, 9906, 1917, 128009, 128006,
                                   78191, 128007, 271]
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == [20, 21, 22, 36, 37]
    assert [llama3.encode(s) for s in ("system", "Be brief.", "Hi!", "2+2?", "4")] == \
        [[9125], [3513, 10015, 13], [13347, 0], [17, 10, 17, 30], [19]]
    assert encode_prompt(CONVERSATION, llama3, TEMPLATES["llama3-chat"]) == ids[:36]


def test_llama3_chat_matches_the_official_jinja_template(llama3):
    """Meta's chat_template from the Instruct model's tokenizer_config.json, rendered with
    jinja2."""
    import jinja2
    config = json.loads(shared_path("models", "llama3-tokenizer", "meta-llama-3-8b-instruct",
                                    "tokenizer_config.json").read_text())
    text = jinja2.Template(config["chat_template"]).render(messages=CONVERSATION["messages"],
                                                           bos_token=config["bos_token"])
    ids, _ = encode_example(CONVERSATION, llama3, TEMPLATES["llama3-chat"], 512)
    assert ids == llama3.enc.encode(text, allowed_special="all")


@pytest.mark.parametrize("system", [None, "", " ", "Be brief."])
def test_llama3_chat_system_message_as_the_official_template_writes_it(llama3, system):
    """No system message: no block. An explicit empty one: an empty block, as Meta's template
    (and ChatFormat) write it; " " also gets a block (stripped to empty)."""
    import jinja2
    config = json.loads(shared_path("models", "llama3-tokenizer", "meta-llama-3-8b-instruct",
                                    "tokenizer_config.json").read_text())
    messages = CONVERSATION["messages"][1:]
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    text = jinja2.Template(config["chat_template"]).render(messages=messages,
                                                           bos_token=config["bos_token"])
    ids, _ = encode_example({"messages": messages}, llama3, TEMPLATES["llama3-chat"], 512)
    assert ids == llama3.enc.encode(text, allowed_special="all")
    assert (128006 in ids[:2]) and ((ids[2] == 9125) == (system is not None))  # the system header


@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_llama2_chat_system_message_as_meta_writes_it(llama2, system):
    """Meta's chat_completion puts B_SYS + system + E_SYS in front of the first user message
    whenever the dialog starts with a system message, empty or not."""
    user = "Hello world" if system is None else \
        "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + "Hello world"
    reference = llama2.encode(f"[INST] {user.strip()} [/INST] Hi! ", bos=True, eos=True)
    messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi!"}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    assert encode_example({"messages": messages}, llama2, TEMPLATES["llama2-chat"], 512)[0] == \
        reference


# ── ChatML: SmolLM2's own chat template ──────────────────

def render_and_encode(tokenizer, messages, add_generation_prompt):
    """The model's chat_template rendered with jinja2, then tokenized as Hugging Face does it:
    the special tokens' text split out first and given their ids, the text between encoded."""
    import jinja2
    text = jinja2.Template(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt)
    specials = "|".join(re.escape(token) for token in tokenizer.special)
    ids = []
    for part in re.split(f"({specials})", text):
        ids += [tokenizer.special[part]] if part in tokenizer.special else tokenizer.encode(part)
    return ids


def as_messages(record):
    """A normalised record as chat messages, the way encode_example reads it (input joins the
    instruction after a blank line)."""
    messages = [] if record["system"] is None else [{"role": "system", "content": record["system"]}]
    for turn in record["turns"]:
        user = turn["instruction"] + (f"\n\n{turn['input']}" if turn["input"] else "")
        messages += [{"role": "user", "content": user},
                     {"role": "assistant", "content": turn["output"]}]
    return messages


def test_chatml_equals_smollm2s_chat_template(smollm2):
    """Every Alpaca record (no system message: the template's default system prompt), explicit
    empty and given system messages, and multi-turn LIMA records: the whole conversation and the
    generation prompt, token for token."""
    chatml = TEMPLATES["chatml"]
    records = load_records(shared_path("data", "alpaca_data_1k.json"))
    lima = [r for r in load_records(shared_path("data", "llamafactory_lima_50.json"))
            if len(r["turns"]) > 1]
    records += [{**records[0], "system": ""},
                {**records[1], "system": "Answer like a pirate."}] + lima[:5]
    for record in records:
        messages = as_messages(record)
        ids, labels = encode_example(record, smollm2, chatml, 100_000)
        assert ids == render_and_encode(smollm2, messages, add_generation_prompt=False)
        assert encode_prompt(record, smollm2, chatml) == \
            render_and_encode(smollm2, messages[:-1], add_generation_prompt=True)
        targets = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert smollm2.decode(targets) == \
            "<|im_end|>".join(t["output"] for t in record["turns"]) + "<|im_end|>"
    assert default_system_prompt(smollm2) == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    no_system, empty = (encode_prompt("Hi", smollm2, chatml),
                        encode_prompt({**records[0], "system": ""}, smollm2, chatml))
    assert smollm2.decode(no_system).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert smollm2.decode(empty).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert no_system[0] == smollm2.special_id("<|im_start|>")  # no BOS: the template writes none


def test_default_system_prompt_of_other_chatml_templates():
    """Qwen2.5 writes its default inside a jinja string with an escaped newline."""
    class Tok:
        chat_template = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
                         "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
                         "{{- '<|im_start|>system\\n"
                         "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                         "<|im_end|>\\n' }}")
    assert default_system_prompt(Tok()) == \
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    Tok.chat_template = None
    assert default_system_prompt(Tok()) is None


def test_llama2_chat_matches_meta_reference(llama2):
    """Meta's llama/generation.py chat_completion, written out: per turn BOS + encode(...) + EOS."""
    dialog = CONVERSATION["messages"]
    user = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
    dialog = [{"role": "user", "content": user}] + dialog[2:]
    reference = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        reference += llama2.encode(f"[INST] {prompt['content'].strip()} [/INST] "
                                   f"{answer['content'].strip()} ", bos=True, eos=True)
    ids, labels = encode_example(CONVERSATION, llama2, TEMPLATES["llama2-chat"], 512)
    assert ids == reference
    targets = [llama2.decode([i for i, label in zip(ids[s:e], labels[s:e])
                              if label != IGNORE_INDEX])
               for s, e in [(0, ids.index(2) + 1), (ids.index(2) + 1, len(ids))]]
    # " Hi! " with the leading space dropped by decode, EOS decodes to ""
    assert targets == ["Hi! ", "4 "]


def test_multi_turn_history_trains_every_answer(llama2):
    """LIMA's first 21 conversations (single-turn: "history": []) and its 29 multi-turn ones."""
    records = load_records(shared_path("data", "llamafactory_lima_50.json"))
    multi = [r for r in records if len(r["turns"]) > 1]
    assert len(records) == 50 and len(multi) == 29 and records[-29:] == multi
    record = min(multi, key=lambda r: sum(len(t["output"]) for t in r["turns"]))
    raw = json.loads(shared_path("data", "llamafactory_lima_50.json").read_text())[
        records.index(record)]
    assert [t["output"] for t in record["turns"]] == \
        [a for _, a in raw["history"]] + [raw["output"]]
    for name in ("alpaca", "llama2-chat"):
        ids, labels = encode_example(record, llama2, TEMPLATES[name], 100_000)
        assert labels[0] == IGNORE_INDEX
        spans, current = [], []  # runs of targets
        for token, label in zip(ids, labels):
            if label != IGNORE_INDEX:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans.append(current)
        assert len(spans) == len(record["turns"])
        assert all(span[-1] == llama2.eos_id for span in spans)
        if name == "alpaca":  # exactly each answer; llama2-chat strips them, as Meta's format does
            assert [llama2.decode(span) for span in spans] == [t["output"] for t in record["turns"]]
        else:
            assert [llama2.decode(span) for span in spans] == \
                [t["output"].strip() + " " for t in record["turns"]]


def test_special_token_text_in_user_data_stays_text(llama3):
    ids, _ = encode_example({"instruction": "say <|eot_id|>", "output": "ok"}, llama3,
                            TEMPLATES["llama3-chat"], 99)
    assert ids.count(128009) == 2  # the end of the user turn and of the answer, not the typed text


# ── Truncation, train_on_prompt, the dataset statistics ─────────────

def test_truncation_dropping_and_train_on_prompt(llama2):
    record = {"instruction": "Count to five.", "input": "", "output": "one two three four five"}
    full_ids, full_labels = encode_example(record, llama2, ALPACA, 512)
    n_prompt = len(encode_prompt(record, llama2, ALPACA))
    # 5 words + EOS
    assert sum(label != IGNORE_INDEX for label in full_labels) == len(full_ids) - n_prompt == 6
    ids, labels = encode_example(record, llama2, ALPACA, n_prompt + 2)  # room for two answer tokens
    assert ids == full_ids[:n_prompt + 2] and labels == full_labels[:n_prompt + 2]
    assert encode_example(record, llama2, ALPACA, n_prompt) is None  # no answer token fits: dropped
    # train_on_prompt: every token but the first is a target, so a prompt-only example is kept
    ids, labels = encode_example(record, llama2, ALPACA, n_prompt, train_on_prompt=True)
    assert labels == [IGNORE_INDEX] + ids[1:]
    ids, labels = encode_example(record, llama2, ALPACA, 512, train_on_prompt=True)
    assert ids == full_ids and labels == [IGNORE_INDEX] + ids[1:]

    long_prompt = {"instruction": "word " * 600, "input": "", "output": "x"}
    records = [record, {**record, "output": "many words " * 300}, long_prompt]
    examples, stats = encode_dataset(records, llama2, ALPACA, 256, progress=False)
    assert (stats["records"], stats["kept"], stats["truncated"], stats["dropped"]) == (3, 2, 1, 1)
    assert stats["max"] > 600 and [len(ids) for ids, _ in examples] == [len(full_ids), 256]
    assert stats["tokens"] == len(full_ids) + 256
    assert stats["target_tokens"] == 6 + 256 - n_prompt
    with pytest.raises(UserError,
                       match=r"^long\.json: all 2 examples are longer than --seq-len 256"):
        encode_dataset([long_prompt, long_prompt], llama2, ALPACA, 256, progress=False,
                       source="long.json")


@pytest.mark.parametrize("template", LLAMA_TEMPLATES)
def test_first_label_is_never_a_target(template, llama3):
    for train_on_prompt in (False, True):
        ids, labels = encode_example(CONVERSATION, llama3, TEMPLATES[template], 512,
                                     train_on_prompt)
        assert ids[0] == llama3.bos_id and labels[0] == IGNORE_INDEX and len(ids) == len(labels)


def naive_lengths(records, tokenizer):
    """How tests/fixtures/README.md counted: encode(prompt) and encode(output) separately."""
    return list(len(tokenizer.encode(PROMPT_DICT["prompt_input" if r["input"]
                                                 else "prompt_no_input"].format(**r), bos=True))
                + len(tokenizer.encode(r["output"], eos=True)) for r in records)


def test_alpaca_statistics_match_the_hand_counts(llama2):
    """tests/fixtures/README.md: alpaca_data_1k min 47, median 115, p95 244, max 559, 2 over 512;
    litgpt fixture min 51, median 119, p95 364, max 406. Its p95 is numpy's interpolated value
    rounded down. Its counts tokenize prompt and output separately, which puts a "▁" in front of
    every output (see the naive test above): that reproduces the table exactly. Our exact
    tokenization changes the count of 185 of the 1000 records by one token (e.g. "▁", "4", "0" →
    "4", "0"), so our min is 48 and p95 243; median, max and the count over 512 stay."""
    records = load_records(shared_path("data", "alpaca_data_1k.json"))
    assert len(records) == 1000 and sum(r["turns"][0]["input"] != "" for r in records) == 392
    turns = [r["turns"][0] for r in records]
    naive = sorted(naive_lengths(turns, llama2))
    assert (naive[0], percentile(naive, 50), int(percentile(naive, 95)), naive[-1]) == \
        (47, 115, 244, 559)
    assert sum(n > 512 for n in naive) == 2
    examples, stats = encode_dataset(records, llama2, ALPACA, 100_000, progress=False)
    ours = sorted(len(ids) for ids, _ in examples)
    assert (stats["min"], stats["p50"], int(stats["p95"]), stats["max"]) == (48, 115, 243, 559)
    assert sum(n > 512 for n in ours) == 2 and stats["kept"] == 1000
    assert sum(n != len(ids) for n, (ids, _) in zip(naive_lengths(turns, llama2), examples)) == 185
    _, stats = encode_dataset(records, llama2, ALPACA, 512, progress=False)
    assert (stats["kept"], stats["truncated"], stats["dropped"]) == (1000, 2, 0)

    records = load_records(shared_path("data", "litgpt_fixture_alpaca.json"))
    naive = sorted(naive_lengths([r["turns"][0] for r in records], llama2))
    _, stats = encode_dataset(records, llama2, ALPACA, 100_000, progress=False)
    assert (len(records), sum(r["turns"][0]["input"] != "" for r in records)) == (23, 6)
    assert (naive[0], percentile(naive, 50), int(percentile(naive, 95)), naive[-1]) == \
        (51, 119, 364, 406)
    assert (stats["min"], stats["p50"], int(stats["p95"]), stats["max"]) == (51, 119, 364, 406)


def test_demo_data_fits_the_byte_model():
    records = load_records(ROOT / "examples" / "alpaca_demo.json")
    assert len(records) == 40 and all(len(r["turns"][0]["output"]) < 150 for r in records)
    for name in ("alpaca", "none"):
        _, stats = encode_dataset(records, ByteTokenizer(), TEMPLATES[name], 256, progress=False)
        assert stats["kept"] == 40 and stats["truncated"] == 0 and stats["max"] <= 256


# ── Batches ───────────────────────────

@pytest.fixture(scope="module")
def tiny_model():
    # one thread: a 64-wide model gains nothing from more, and on a busy 2-core machine OpenMP's
    # spinning threads made these few forward passes take seconds instead of milliseconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = Transformer(ModelConfig.from_name("tiny"))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    yield model.float().eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_examples(tok512):
    records = load_records(ROOT / "examples" / "alpaca_demo.json")[:9]
    return [encode_example(r, tok512, TEMPLATES["none"], 256) for r in records]


def losses_by_example(model, batch):
    """{input ids of one example: (summed loss, target count)} from one forward pass of a batch."""
    with torch.no_grad():
        logits = model(batch["tokens"], batch["positions"], batch["doc_ids"])
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # as model.loss shifts them
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                         reduction="none").view(targets.shape)
    docs = batch["doc_ids"] if batch["doc_ids"] is not None else torch.zeros_like(batch["tokens"])
    out = {}
    for row in range(len(batch["tokens"])):
        for doc in docs[row, :batch["lengths"][row]].unique():
            where = docs[row] == doc
            tokens = tuple(batch["tokens"][row][where].tolist())
            if batch["doc_ids"] is None:
                tokens = tokens[:batch["lengths"][row]]
            out[tokens] = (ce[row][where].sum(), int((targets[row][where] != IGNORE_INDEX).sum()))
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_batched_loss_equals_one_by_one(packing, tiny_model, demo_examples):
    batches = make_batches(demo_examples, 3, pad_id=0, max_seq_len=128, packing=packing, seed=1)
    batched = {}
    for batch in batches:
        batched.update(losses_by_example(tiny_model, batch))
        with torch.no_grad():  # model.loss is the sum of the same per-token losses
            total = tiny_model.loss(batch["tokens"], batch["labels"], batch["positions"],
                                    batch["doc_ids"])
        assert torch.allclose(total, sum(loss for loss, _ in
                                         losses_by_example(tiny_model, batch).values()))
    assert len(batched) == len(demo_examples)
    for ids, labels in demo_examples:
        with torch.no_grad():
            alone = tiny_model.loss(torch.tensor([ids]), torch.tensor([labels]))
        loss, n_targets = batched[tuple(ids)]
        assert n_targets == sum(label != IGNORE_INDEX for label in labels[1:]) > 0
        assert abs(loss.item() - alone.item()) / n_targets <= 1e-5  # per target token
    if packing:
        assert len(batches[0]["tokens"]) == 3 and batches[0]["tokens"].shape[1] <= 128


@pytest.mark.parametrize("packing", [True, False])
def test_padding_to_a_multiple_changes_widths_not_the_loss(packing, tiny_model, demo_examples):
    """pad_to_multiple_of (CUDA graphs and compiled steps reuse each width): the same batches,
    a few widths, multiples of 64 up to max_seq_len; the loss and its gradient unchanged, as the
    extra positions are padding."""
    options = dict(pad_id=0, max_seq_len=200, packing=packing, seed=3)
    plain = make_batches(demo_examples, 4, **options)
    padded = make_batches(demo_examples, 4, pad_to_multiple_of=64, **options)
    widths = {b["tokens"].shape[1] for b in padded}
    assert widths <= {64, 128, 192, 200}
    assert len(widths) <= len({b["tokens"].shape[1] for b in plain})
    for a, b in zip(plain, padded, strict=True):
        width = a["tokens"].shape[1]
        assert b["tokens"].shape[1] == min(-(-width // 64) * 64, 200)
        assert torch.equal(a["tokens"], b["tokens"][:, :width]) and torch.equal(a["lengths"],
                                                                                 b["lengths"])
        assert (b["labels"][:, width:] == IGNORE_INDEX).all()
        losses, grads = [], []
        for batch in (a, b):
            tiny_model.zero_grad()
            loss = tiny_model.loss(batch["tokens"], batch["labels"], batch["positions"],
                                   batch["doc_ids"])
            loss.backward()
            losses.append(loss.item())
            grads.append(tiny_model.lm_head.weight.grad.clone())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_packed_batch_layout():
    examples = [([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7]),
                ([1, 8, 9], [IGNORE_INDEX, 8, 9]), ([1, 4], [IGNORE_INDEX, 4])]
    (batch,) = make_batches(examples, 4, pad_id=0, max_seq_len=6, packing=True, shuffle=False)
    # best fit, longest first: [4 tokens + 2 tokens] and [3 tokens + padding]
    assert batch["tokens"].tolist() == [[1, 5, 6, 7, 1, 4], [1, 8, 9, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, -100, 4], [-100, 8, 9, -100, -100, -100]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # padding: a document of its own
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch["lengths"].tolist() == [6, 3] and batch_efficiency([batch]) == 9 / 12
    (batch,) = make_batches(examples, 4, pad_id=0, max_seq_len=6, shuffle=False)
    assert batch["tokens"].tolist() == [[1, 5, 6, 7], [1, 8, 9, 0], [1, 4, 0, 0]]
    assert batch["labels"][1, 3] == IGNORE_INDEX and batch["positions"] is None and \
        batch["doc_ids"] is None


def test_length_grouping_and_packing_waste_less_padding(llama2):
    examples, _ = encode_dataset(load_records(shared_path("data", "alpaca_data_1k.json")), llama2,
                                 ALPACA, 512, progress=False)
    options = dict(pad_id=0, max_seq_len=512)
    random_order = batch_efficiency(make_batches(examples, 8, group_by_length=False, **options))
    grouped_batches = make_batches(examples, 8, **options)
    packed = batch_efficiency(make_batches(examples, 8, packing=True, **options))
    assert random_order < 0.6 < 0.95 < batch_efficiency(grouped_batches) and packed > 0.97
    assert grouped_batches[0]["tokens"].shape[1] == 512  # the longest batch comes first
    assert sum(len(b["tokens"]) for b in grouped_batches) == 1000


def test_batches_and_split_are_deterministic():
    examples = [([1] + [7] * n, [IGNORE_INDEX] + [7] * n) for n in range(1, 300)]
    for packing in (False, True):
        def run(seed, epoch):
            return [b["tokens"].tolist()
                    for b in make_batches(examples, 4, pad_id=0, max_seq_len=400,
                                          packing=packing, seed=seed, epoch=epoch)]
        assert run(0, 0) == run(0, 0) and run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
        rows = sorted(len(row) - row.count(0) for batch in run(0, 1) for row in batch)
        if not packing:
            assert rows == sorted(len(ids) for ids, _ in examples)  # every example once
        else:
            assert sum(rows) == sum(len(ids) for ids, _ in examples) and max(rows) <= 400
    records = list(range(1000))
    train, val = split_train_val(records, 0.1, seed=3)
    assert (train, val) == split_train_val(records, 0.1, seed=3) and \
        val != split_train_val(records, 0.1, seed=4)[1]
    assert len(val) == 100 and sorted(train + val) == records and train == sorted(train)
    assert len(split_train_val(records[:5], 0.01)[1]) == 1 and \
        split_train_val(records[:1], 0.5) == ([0], [])
    assert split_train_val(records, 0) == (records, [])
    with pytest.raises(UserError, match="--val-split"):
        split_train_val(records, 1.5)


# ── Loading and bad input ───────────────────────

def test_loads_json_jsonl_and_chat(tmp_path):
    alpaca = [{"instruction": "a", "input": "b", "output": "c"},
              {"instruction": "d", "output": "e", "extra": 1}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca) + "\n\n")
    expected = [{"system": None, "turns": [{"instruction": "a", "input": "b", "output": "c"}]},
                {"system": None, "turns": [{"instruction": "d", "input": "", "output": "e"}]}]
    assert load_records(tmp_path / "a.json") == load_records(tmp_path / "a.jsonl") == expected
    (tmp_path / "chat.jsonl").write_text(json.dumps(CONVERSATION) + "\n")
    assert load_records(tmp_path / "chat.jsonl") == [{"system": "Be brief.", "turns": [
        {"instruction": "Hello world", "input": "", "output": " Hi! "},
        {"instruction": "2+2?", "input": "", "output": "4"}]}]
    history = [{"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]}]
    (tmp_path / "h.json").write_text(json.dumps(history))
    assert [t["output"] for t in load_records(tmp_path / "h.json")[0]["turns"]] == ["a1", "a2"]


def chat(*messages):
    return json.dumps([{"messages": [{"role": role, "content": content}
                                     for role, content in messages]}])


BAD_FILES = [
    ("", "the file is empty"),
    ("[]", "no records"),
    ('[{"instruction": "a", "output": "b"},', "not valid JSON (line 1, column"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', "line 2: not valid JSON"),
    ('[{"instruction": "a", "output": "b"}, 5]', "record 2: expected an object, got a number"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "a"}]',
     "record 2: missing key 'output'"),
    ('{"instruction": "a", "output": "b"}\n\n{"output": "b"}', "line 3: missing key 'instruction'"),
    ('[{"instruction": "a", "output": 3}]', "record 1: 'output' must be a string, got a number"),
    ('[{"instruction": "a", "input": ["x"], "output": "b"}]',
     "record 1: 'input' must be a string, got an array"),
    ('[{"instruction": "a", "output": "b", "history": [["only one"]]}]',
     "record 1: 'history' must be a list"),
    (chat(("user", "hi"), ("tool", "x")), "record 1: message 2: unknown role 'tool'"),
    (chat(("system", "s"), ("user", "hi")), "record 1: the conversation has no assistant message"),
    (chat(("user", "hi"), ("assistant", "yo"), ("user", "and?")),
     "record 1: the conversation ends with a user"),
    (chat(("user", "hi"), ("user", "again"), ("assistant", "yo")),
     "message 2: two user messages in a row"),
    (chat(("user", "hi"), ("system", "s"), ("assistant", "yo")),
     "message 2: a system message must be the first"),
    ('[{"messages": [{"role": "user", "content": 5}]}]',
     "message 1: 'content' must be a string, got a number"),
    ('[{"messages": []}]', "record 1: 'messages' must be a non-empty array"),
]


@pytest.mark.parametrize("text, message", BAD_FILES)
def test_bad_input_names_file_and_record(tmp_path, text, message):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_records(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_other_user_errors(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(UserError, match=r"seed_tasks\.jsonl: line 1: missing key 'output'"):
        # the seed tasks keep outputs in "instances"
        load_records(shared_path("data", "seed_tasks.jsonl"))
    with pytest.raises(UserError, match="unknown template 'vicuna'; known: auto, alpaca, "
                                        "llama2-chat, llama3-chat, chatml, none"):
        get_template("vicuna")
    with pytest.raises(UserError, match="argument --template: invalid choice: 'vicuna'"):
        main(["--data", str(tmp_path / "x.json"), "--tokenizer", "x", "--template", "vicuna"])


def cli_argv(*flags):
    return ["--data", "examples/alpaca_demo.json", "--tokenizer", "x", *flags]


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "0"], "argument --seq-len: must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["--seq-len", "many"], "argument --seq-len: must be an integer >= 1, got 'many'"),
    (["--show", "-1"], "argument --show: must be an integer >= 0, got -1"),
    (["--template", "chat"], "argument --template: invalid choice: 'chat' (choose from 'auto', "
                             "'alpaca', 'llama2-chat', 'llama3-chat', 'chatml', 'none')"),
])
def test_cli_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(UserError) as error:
        main(cli_argv(*flags))
    assert str(error.value) == message


def test_cli_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    assert exit_status.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal
    for expected in ["{auto,alpaca,llama2-chat,llama3-chat,chatml,none}",
                     "chat template, else alpaca (default: auto)", "truncated (default: 512)",
                     "to print (default: 3)", "statistics (default: 8)",
                     "prompt tokens (default: off)", "python data.py --data"]:
        assert expected in help_text


def test_cli_show_0_prints_only_the_statistics(capsys, monkeypatch):
    tokenizer = str(shared_path("models", "llama2-tokenizer", "tokenizer.model"))
    monkeypatch.chdir(ROOT)
    main(["--data", "examples/alpaca_demo.json", "--tokenizer", tokenizer, "--show", "0"])
    out = capsys.readouterr().out
    assert "example" not in out and out.startswith("records 40 (40 turns): kept 40")


def test_format_example_marks_targets(llama2):
    ids, labels = encode_example({"instruction": "Hi", "output": "Hello there"}, llama2,
                                 TEMPLATES["none"], 64)
    assert format_example(ids, labels, llama2) == "<s>Hi[[Hello there</s>]]"
    assert format_example(ids, labels, llama2, color=True) == "<s>Hi\033[32mHello there</s>\033[0m"


def test_cli(tmp_path):
    tokenizer = str(shared_path("models", "llama2-tokenizer", "tokenizer.model"))
    run = subprocess.run([sys.executable, "data.py", "--data", "examples/alpaca_demo.json",
                          "--tokenizer", tokenizer, "--show", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "### Response:\n[[2 + 3 = 5.</s>]]" in run.stdout
    assert "records 40 (40 turns): kept 40 (0 truncated to 512 tokens), dropped 0" in run.stdout
    assert "padding efficiency at batch size 8, packed:" in run.stdout and "median" in run.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    run = subprocess.run([sys.executable, "data.py", "--data", str(bad), "--tokenizer", tokenizer],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: {bad}: record 2: missing key 'output' (Alpaca records need " \
                         "'instruction' and 'output'; the other formats: docs/data.md)\n"
    run = subprocess.run([sys.executable, "data.py", "--data", str(bad), "--tokenizer", tokenizer,
                          "--seq-len", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""  # a one-line error, not a traceback
    assert run.stderr == "error: argument --seq-len: must be an integer >= 1, got 0\n"
