"""records.py and formats/data_files.py: the same records in every record format (Alpaca, Dolly,
ShareGPT, prompt/completion, chat messages) and every file format (JSON, JSON Lines, CSV, TSV,
Parquet, a folder, a wrapped array) give the same records, ids and labels; each mistake is one
line. The records are the real Alpaca and LIMA data of tests/fixtures, written out by the test."""
import csv
import json
import sys

import pytest

from conftest import shared_path
from data import TEMPLATES, encode_dataset
from errors import UserError
from records import load_records, normalize_record, parse_columns

pyarrow = pytest.importorskip("pyarrow")  # requirements-dev.txt
import pyarrow.parquet  # noqa: E402


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


# ── Files: every file format gives the records of the JSON array ──────────────────

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


# ── Records: every record format gives the same conversations, ids and labels ─────────────

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


# ── --columns ──────────────────────────────────────────────────────────────────────

def test_columns_map_their_keys_to_ours(tmp_path):
    rows = [{"question": "2+2?", "answer": "4", "output": "ignored"}]
    path = write_csv(tmp_path / "q.csv", rows)
    columns = parse_columns("output=answer, instruction=question")
    assert columns == {"output": "answer", "instruction": "question"}
    assert load_records(path, columns) == [
        {"system": None, "turns": [{"instruction": "2+2?", "input": "", "output": "4"}]}]
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


# ── Mistakes: one line each ──────────────────────────────────────────────────────────

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


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", [{"instruction": "a", "output": "b"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import pyarrow.parquet fails
    with pytest.raises(UserError) as error:
        load_records(path)
    assert str(error.value) == f"{path}: reading Parquet needs pyarrow, which is not installed: " \
                               "pip install pyarrow"
