"""records.py and formats/data_files.py: the same records in every record format (Alpaca, Dolly,
ShareGPT, prompt/completion, chat messages) and every file format (JSON, JSON Lines, CSV, TSV,
Parquet, a folder, a wrapped array) give the same records, ids and labels; each mistake is one
line. The records are the real Alpaca and LIMA data of tests/fixtures, written out by the test."""
import csv
import json
import statistics
import sys

import numpy

import pyarrow  # (requirements-dev.txt; at run time an optional dependency)
import pyarrow.parquet
import pytest

from conftest import shared_path
from chat_template import ChatTemplate
from data import encode_dataset, encode_example, main, tokenize_conversation
from errors import UserError
from model import IGNORE_INDEX
from records import load_records, normalize_record, parse_columns
from templates import TEMPLATES


@pytest.fixture(scope="module")
def alpaca():
    """The 1,000 Stanford Alpaca records (392 with an input), as the file has them."""
    return json.loads(shared_path("data", "alpaca_data_1k.json").read_text())


@pytest.fixture(scope="module")
def lima():
    """50 LIMA conversations in LLaMA-Factory's Alpaca form (29 with a "history")."""
    return json.loads(shared_path("data", "llamafactory_lima_50.json").read_text())


def write_csv(path, records, delimiter=","):
    columns = list(dict.fromkeys(key for record in records for key in record))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path, records):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False))
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def user_text(record):
    """An Alpaca record's user message in a format without an input: the input after a blank
    line, as data.py's templates without an input slot write it."""
    return f"{record['instruction']}\n\n{record['input']}" if record["input"] else \
        record["instruction"]


def turns_of(record):
    """An Alpaca (+ LLaMA-Factory history) record → [(user, assistant), ...]."""
    return [*map(tuple, record.get("history") or []), (user_text(record), record["output"])]


def as_sharegpt(record):
    names = {"user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                              for m in as_messages(record)["messages"]]}


def as_messages(record):
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, answer in turns_of(record):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def as_prompt_completion(record):
    messages = as_messages(record)["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


# ── Files: every file format gives the records of the JSON array ────────────────────────────────

def test_every_file_format_reads_the_same_records(alpaca, tmp_path):
    expected = load_records(shared_path("data", "alpaca_data_1k.json"))
    assert len(expected) == 1000
    folder = tmp_path / "folder"
    folder.mkdir()
    write_json(folder / "b.json", alpaca[400:])  # read after a.csv: sorted by name
    write_csv(folder / "a.csv", alpaca[:400])
    (folder / "notes.txt").write_text("not data")  # (not a data file: left alone)
    files = [write_jsonl(tmp_path / "a.jsonl", alpaca),
             write_csv(tmp_path / "a.csv", alpaca),
             write_csv(tmp_path / "a.tsv", alpaca, delimiter="\t"),
             write_parquet(tmp_path / "a.parquet", alpaca),
             write_json(tmp_path / "wrapped.json", {"train": alpaca}),
             folder]
    for path in files:
        said = []
        assert load_records(path, say=said.append) == expected, path
        assert said[-1] == f"read 1,000 records as Alpaca from {path}"
    said = []
    load_records(folder, say=said.append)
    assert said[0] == f"reading the 2 data files of {folder}: a.csv, b.json"


def test_a_record_that_fails_is_named_by_its_row_or_line(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    with pytest.raises(UserError, match=r"a\.csv: row 3: missing key 'output'"):
        load_records(write_csv(tmp_path / "a.csv", rows))  # the header is row 1
    with pytest.raises(UserError, match=r"a\.parquet: record 2: missing key 'output'"):
        load_records(write_parquet(tmp_path / "a.parquet", rows))
    with pytest.raises(UserError, match=r"w\.json: 'data' record 2: missing key 'output'"):
        load_records(write_json(tmp_path / "w.json", {"data": rows}))


# ── Records: every record format gives the same conversations, ids and labels ───────────────────

def test_dolly_is_alpaca_with_context_as_input(alpaca, tmp_path):
    dolly = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"],
              "category": "open_qa"} for r in alpaca]
    said = []
    assert load_records(write_jsonl(tmp_path / "dolly.jsonl", dolly), say=said.append) == \
        load_records(shared_path("data", "alpaca_data_1k.json"))
    assert said == [f"read 1,000 records as Dolly from {tmp_path / 'dolly.jsonl'}"]


@pytest.mark.parametrize("name, convert", [("ShareGPT", as_sharegpt),
                                           ("OpenAI messages", as_messages),
                                           ("prompt/completion", as_prompt_completion)])
def test_chat_formats_give_the_same_ids_and_labels(name, convert, alpaca, lima, llama3, tmp_path):
    """Alpaca's input joins the instruction in a chat (no input slot): with a template that
    writes it so (llama3-chat), the ids and labels are the same as from the Alpaca file."""
    template = TEMPLATES["llama3-chat"]
    for source, records in (("alpaca", alpaca[:300]), ("lima", lima)):
        path = write_parquet(tmp_path / f"{source}.parquet", [convert(r) for r in records])
        said = []
        converted = load_records(path, say=said.append)
        assert said == [f"read {len(records)} records as {name} from {path}"]
        original = load_records(write_json(tmp_path / f"{source}.json", records))
        assert encode_dataset(converted, llama3, template, 2048) == \
            encode_dataset(original, llama3, template, 2048)
    assert max(len(r["turns"]) for r in converted) > 2  # LIMA's multi-turn conversations


def test_prompt_completion_strings_and_sharegpt_system():
    assert normalize_record({"prompt": "2+2?", "completion": "4"}) == \
        {"system": None, "turns": [{"instruction": "2+2?", "input": "", "output": "4"}]}
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "model", "value": "Hello."},
        {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}
    assert normalize_record(sharegpt) == {"system": "Be brief.", "turns": [
        {"instruction": "Hi", "input": "", "output": "Hello."},
        {"instruction": "2+2?", "input": "", "output": "4"}]}
    sharegpt["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    del sharegpt["system"]
    assert normalize_record(sharegpt)["system"] == "Be brief."


def test_several_formats_in_one_file_are_counted(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"prompt": "c", "completion": "d"},
            {"instruction": "e", "output": "f"}]
    said = []
    load_records(write_jsonl(tmp_path / "m.jsonl", rows), say=said.append)
    assert said == [f"read 3 records (2 Alpaca, 1 prompt/completion) from {tmp_path / 'm.jsonl'}"]


# ── --columns ───────────────────────────────────────────────────────────────────────────────────

def test_columns_map_their_keys_to_ours(tmp_path):
    rows = [{"question": "2+2?", "answer": "4", "output": "ignored"}]
    path = write_csv(tmp_path / "q.csv", rows)
    columns = parse_columns("output=answer, instruction=question")
    assert columns == {"output": "answer", "instruction": "question"}
    assert load_records(path, columns) == [
        {"system": None, "turns": [{"instruction": "2+2?", "input": "", "output": "4"}]}]
    kept = write_jsonl(tmp_path / "k.jsonl", [{"question": "a", "answer": "b"},
                                             {"instruction": "c", "output": "d"}])
    assert [r["turns"][0]["output"] for r in load_records(kept, columns)] == ["b", "d"]
    with pytest.raises(UserError, match="^--columns output=reply: no record of .*q.csv has the "
                                        "key 'reply'$"):
        load_records(path, {"output": "reply"})


@pytest.mark.parametrize("text, message", [
    ("output", "expected OURS=THEIRS pairs separated by commas"),
    ("output=", "expected OURS=THEIRS pairs"),
    ("answer=output", "'answer' is not a key records have (one of: instruction, input, output"),
])
def test_bad_columns_are_one_line_errors(text, message):
    with pytest.raises(UserError) as error:
        parse_columns(text)
    assert str(error.value).startswith(f"--columns {text!r}: {message}")


# ── Mistakes: one line each ─────────────────────────────────────────────────────────────────────

BAD = [
    ("bad.csv", "instruction,output\na,b,c\n", "bad.csv: row 2 has 3 cells, the header 2"),
    ("bad.csv", "instruction,instruction\na,b\n", "bad.csv: the header row ['instruction', "
                                                  "'instruction'] needs a distinct name"),
    ("bad.csv", "instruction,output\n", "bad.csv: no records"),
    ("bad.json", '{"train": [], "test": []}', "bad.json: an object with several arrays (train, "
                                              "test); data is one array of records"),
    ("bad.json", '{"data": []}', "bad.json: no records"),
    ("bad.parquet", "not parquet", "bad.parquet: not a Parquet file pyarrow can read ("),
    ("bad.json", json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                {"from": "bot", "value": "yo"}]}]),
     "bad.json: record 1: message 2: unknown from 'bot' (expected one of: system, human, user, "
     "gpt, assistant, model)"),
    ("bad.json", json.dumps([{"conversations": [{"role": "user", "content": "hi"}]}]),
     "bad.json: record 1: message 1: expected an object with 'from' and 'value'"),
    ("bad.json", json.dumps([{"system": "s", "conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "yo"}]}]),
     "bad.json: record 1: a 'system' field and a system message: give one of them"),
    ("bad.json", json.dumps([{"prompt": "hi", "completion": [{"role": "assistant",
                                                              "content": "yo"}]}]),
     "bad.json: record 1: 'prompt' and 'completion' must be both strings or both lists of "
     "messages, got a string and an array"),
    ("bad.json", json.dumps([{"instruction": "hi", "response": 5}]),
     "bad.json: record 1: 'output' must be a string, got a number"),
]


@pytest.mark.parametrize("name, text, message", BAD)
def test_bad_files_are_one_line_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_records(path)
    assert str(error.value).startswith(f"{tmp_path}/{message}"), str(error.value)
    assert "\n" not in str(error.value)


def test_parquet_cells_of_other_types_are_named(tmp_path):
    path = write_parquet(tmp_path / "b.parquet", [{"instruction": "a", "output": b"bytes"}])
    with pytest.raises(UserError, match=r"b\.parquet: record 1: 'output' must be a string, got "
                                        "a bytes value$"):
        load_records(path)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", [{"instruction": "a", "output": "b"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet fails
    with pytest.raises(UserError) as error:
        load_records(path)
    assert str(error.value) == f"{path}: reading Parquet needs pyarrow, which is not installed: " \
                               "pip install pyarrow"


# ── --train-on: every assistant turn, or the last ───────────────────────────────────────────────

def answers(ids, labels, tokenizer):
    """The decoded runs of target tokens."""
    runs, run = [], []
    for token, label in zip(ids + [None], labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("template", ["llama2-chat", "alpaca", "jinja"])
def test_train_on_last_trains_the_last_answer_alone(template, lima, llama2):
    """LIMA's multi-turn conversations: --train-on all trains every answer, last only the last;
    the ids are the same. jinja: TinyLlama's chat template (tests/fixtures; its vocabulary is
    Llama-2's)."""
    tokenizer = llama2
    if template == "jinja":
        folder = shared_path("models", "llama2-tokenizer", "tinyllama-1.1b-chat-v1.0")
        template = ChatTemplate((folder / "chat_template.jinja").read_text())
    else:
        template = TEMPLATES[template]
    records = [r for r in load_records(shared_path("data", "llamafactory_lima_50.json"))
               if len(r["turns"]) >= 3][:3]
    assert records
    for record in records:
        every = encode_example(record, tokenizer, template, 4096)
        last = encode_example(record, tokenizer, template, 4096, train_on="last")
        assert last[0] == every[0]
        trained = answers(*every, tokenizer)
        assert len(trained) == len(record["turns"])
        assert answers(*last, tokenizer) == trained[-1:]
        assert trained[-1].strip().startswith(record["turns"][-1]["output"].strip()[:50])
        assert [label for label in last[1] if label != IGNORE_INDEX] == \
            [label for label in every[1] if label != IGNORE_INDEX][-len(
                [label for label in last[1] if label != IGNORE_INDEX]):]


def test_train_on_last_with_truncation_drops_what_loses_its_last_answer(llama2):
    record = normalize_record({"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a long story. " * 20},
        {"role": "assistant", "content": "Once."}]})
    template = TEMPLATES["llama2-chat"]
    assert encode_example(record, llama2, template, 40) is not None  # "Hello." fits
    assert encode_example(record, llama2, template, 40, train_on="last") is None


def test_train_on_last_is_shown_and_contradicts_train_on_prompt(capsys, llama2):
    tokenizer = str(shared_path("models", "llama2-tokenizer", "tokenizer.model"))
    lima = str(shared_path("data", "llamafactory_lima_50.json"))
    main(["--data", lima, "--tokenizer", tokenizer, "--template", "llama2-chat", "--show", "50",
          "--train-on", "last", "--seq-len", "4096"])
    shown = capsys.readouterr().out
    assert "trained on" in shown and "--train-on last)" in shown
    examples = [example.split("\n", 1)[1] for example in shown.split("── example ")[1:]]
    assert len(examples) == 50 and all(example.count("[[") == 1 for example in examples)
    with pytest.raises(UserError, match="^--train-on last and --train-on-prompt contradict each "
                                        "other"):
        main(["--data", lima, "--tokenizer", tokenizer, "--train-on", "last",
              "--train-on-prompt"])


# ── data.py --stats ─────────────────────────────────────────────────────────────────────────────

def test_stats_counts_records_turns_lengths_truncation_and_trained_tokens(tmp_path, llama2,
                                                                          capsys):
    """The numbers --stats prints, against counts made here from the ids and labels."""
    tokenizer = str(shared_path("models", "llama2-tokenizer", "tokenizer.model"))
    path = shared_path("data", "llamafactory_lima_50.json")
    records = load_records(path)
    main(["--stats", str(path), "--tokenizer", tokenizer, "--template", "llama2-chat",
          "--seq-len", "512", "--train-on", "last"])
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == f"read 50 records as Alpaca from {path}"
    lines = captured.out.splitlines()
    assert len(lines) == 3 and "example" not in captured.out and "padding" not in captured.out
    full = [tokenize_conversation(r, llama2, TEMPLATES["llama2-chat"]) for r in records]
    lengths = sorted(len(ids) for ids, _ in full)
    examples = [encode_example(r, llama2, TEMPLATES["llama2-chat"], 512, train_on="last")
                for r in records]
    kept = [e for e in examples if e is not None]
    truncated = sum(len(ids) > 512 for (ids, _), e in zip(full, examples) if e is not None)
    turns = sum(len(r["turns"]) for r in records)
    assert turns > 50 and truncated > 0
    assert lines[0] == (f"records 50 ({turns} turns): kept {len(kept)} ({truncated} truncated to "
                        f"512 tokens), dropped {50 - len(kept)} (prompt alone fills --seq-len)")
    tokens = sum(len(ids) for ids, _ in kept)
    trained = sum(label != IGNORE_INDEX for _, labels in kept for label in labels)
    assert lines[1] == (f"tokens {tokens}, trained on {trained} ({trained / tokens:.0%}; "
                        "--train-on last)")
    median = statistics.median(lengths)
    p95 = float(numpy.percentile(lengths, 95))
    assert lines[2] == (f"length before truncation: min {lengths[0]}, median {median:.0f}, "
                        f"p95 {p95:.0f}, max {lengths[-1]}")


def test_stats_with_the_demo_tokenizer_and_flag_mistakes(tmp_path, capsys):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    path = write_parquet(tmp_path / "q.parquet", rows)
    main(["--stats", str(path), "--checkpoint", "tiny", "--columns",
          "instruction=question,output=answer"])
    assert capsys.readouterr().out.startswith("records 2 (2 turns): kept 2")
    for flags, message in [
            ([], "give --data (examples and statistics) or --stats FILE (statistics), one of them"),
            (["--stats", str(path), "--data", str(path)], "give --data"),
            (["--stats", str(path)], "give --tokenizer or --checkpoint"),
            (["--stats", str(path), "--columns", "out=answer"],
             "argument --columns: 'out' is not a key records have")]:
        with pytest.raises(UserError) as error:
            main(flags)
        assert str(error.value).startswith(message)
