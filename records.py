"""Reading training data: records of Alpaca, ShareGPT, Dolly, prompt/completion or chat
messages → one normalised shape, which data.py turns into token ids:

    {"system": str | None, "turns": [{"instruction": str, "input": str, "output": str}, ...]}

"system" is None when the record has no system message and "" when it has an explicit empty one:
official chat templates write the two differently (Llama-3 writes an empty system block for "",
ChatML writes the model's default system prompt for None).

The format of each record is told by its keys (FORMAT_KEYS; docs/data.md has an example of each).
The files that hold them (JSON, JSON Lines, CSV, Parquet, a folder) are read by
formats/data_files.py. Every mistake in a file is a UserError of one line that names the file and
the record (or, in JSON Lines and CSV, the line or row an editor shows).
"""
import math
import random
import re
from collections import Counter
from pathlib import Path

from errors import UserError, text_checked_by, utf8_problem
from formats.data_files import data_paths, read_items

ROLES = ("system", "user", "assistant")
# ShareGPT's "from" → our role (FastChat's names, and the OpenAI and Gemini ones some sets use)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant"}
# The keys that tell a record's format, tried in this order; a record with none is Alpaca.
FORMAT_KEYS = {"OpenAI messages": ("messages",), "ShareGPT": ("conversations",),
               "prompt/completion": ("prompt", "completion"),
               "Dolly": ("instruction", "response")}  # (and no "output": that is Alpaca)
KEYS = ("instruction", "input", "output", "history", "system", "messages", "conversations",
        "prompt", "completion", "context", "response")  # every key a record is read by
# --data PATH:WEIGHT: what follows the last colon, when the user meant it as a number
WEIGHT = re.compile(r"[-+0-9.eE]*|nan|inf", re.IGNORECASE)
JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
                   float: "a number", bool: "a boolean"}


def json_type(value) -> str:
    """A value's type in JSON's words; a Parquet cell may hold others (bytes, a date)."""
    if value is None:
        return "null"
    return JSON_TYPE_NAMES.get(type(value), f"a {type(value).__name__} value")


def load_records(path, columns: dict | None = None, say=None) -> list[dict]:
    """Read the records of a data file or a folder of them (formats/data_files.py: JSON, JSON
    Lines, CSV, TSV, Parquet), each normalised to the shape at the top of this file. `columns`
    ({our key: their key}, from --columns) renames keys first. `say` gets one line: how many
    records were read, in which formats ("read 52,002 records as ShareGPT")."""
    files = data_paths(path)
    if say and len(files) > 1:
        say(f"reading the {len(files)} data files of {path}: "
            f"{', '.join(file.name for file in files)}")
    records, formats = [], Counter()
    for file in files:
        items, places = read_items(file)
        if columns:
            items = rename_columns(items, columns, file)
        for item, where in zip(items, places):
            records.append(normalize_record(item, where))
            formats[record_format(item)] += 1
    if say:
        kinds = [f"{count:,} {name}" for name, count in formats.most_common()]
        said = f"as {formats.most_common()[0][0]}" if len(formats) == 1 else f"({', '.join(kinds)})"
        say(f"read {len(records):,} records {said} from {path}")
    return records


def parse_columns(text: str) -> dict:
    """--columns "output=answer,instruction=question" → {"output": "answer", ...}: our key =
    the key in the file."""
    columns = {}
    for pair in text.split(","):
        ours, equals, theirs = (part.strip() for part in pair.partition("="))
        if not equals or not ours or not theirs:
            raise UserError(f"--columns {text!r}: expected OURS=THEIRS pairs separated by commas, "
                            "e.g. output=answer,instruction=question")
        if ours not in KEYS:
            raise UserError(f"--columns {text!r}: {ours!r} is not a key records have (one of: "
                            f"{', '.join(KEYS)})")
        columns[ours] = theirs
    return columns


def parse_source(text: str) -> tuple[str, float | None]:
    """--data PATH or PATH:WEIGHT → (path, weight or None). A path that exists is read as a path,
    colons and all; otherwise what follows the last colon is a weight when it looks like a
    number, and a number in (0, 1] it must be."""
    path, colon, weight = text.rpartition(":")
    if Path(text).exists() or not colon or not WEIGHT.fullmatch(weight):
        return text, None
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # (false for nan)
        raise UserError(f"--data {text}: the weight after ':' must be a number in (0, 1], the "
                        f"share of every epoch drawn from {path or 'the file'}; got {weight!r}")
    if not path:
        raise UserError(f"--data {text}: no file before the weight")
    return path, value


columns_flag = text_checked_by(parse_columns)  # argparse's type= for --columns
data_source = text_checked_by(parse_source)  # argparse's type= for --data


def rename_columns(items: list, columns: dict, path) -> list:
    """Each record's keys renamed: their key → ours. A key of ours already in the record gives
    way to the renamed one, when the record has it. A key of theirs in no record is a mistake in
    --columns."""
    for ours, theirs in columns.items():
        if not any(isinstance(item, dict) and theirs in item for item in items):
            raise UserError(f"--columns {ours}={theirs}: no record of {path} has the key "
                            f"{theirs!r}")
    renamed = []
    for item in items:
        if isinstance(item, dict):
            kept = {key: value for key, value in item.items() if key not in columns.values()}
            kept.update({ours: item[theirs] for ours, theirs in columns.items() if theirs in item})
            item = kept
        renamed.append(item)
    return renamed


def record_format(record) -> str:
    """Which of FORMAT_KEYS' formats a raw record is, by its keys (Alpaca when none other fits)."""
    if isinstance(record, dict):
        for name, keys in FORMAT_KEYS.items():
            if all(key in record for key in keys):
                if name != "Dolly" or "output" not in record:
                    return name
    return "Alpaca"


def normalize_record(record, where: str = "record") -> dict:
    """One raw record, in any of the formats (FORMAT_KEYS) → the normalised shape."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {json_type(record)}")
    kind = record_format(record)
    if kind == "OpenAI messages":
        return _from_messages(record["messages"], where)
    if kind == "ShareGPT":
        return _from_sharegpt(record, where)
    if kind == "prompt/completion":
        return _from_prompt_completion(record, where)
    if kind == "Dolly":  # the context is the input
        record = {"instruction": record.get("instruction"), "input": record.get("context"),
                  "output": record.get("response")}
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"{where}: missing key {key!r} (Alpaca records need 'instruction' "
                            "and 'output'; the other formats: docs/data.md)")
    history = record.get("history") or []
    if not _is_history(history):
        raise UserError(f"{where}: 'history' must be a list of [user, assistant] string pairs")
    turns = [{"instruction": user, "input": "", "output": answer} for user, answer in history]
    turns.append({key: _string(record, key, where) for key in ("instruction", "input", "output")})
    system = None
    if record.get("system") is not None:
        system = _string(record, "system", where)
    return {"system": system, "turns": turns}


def _is_history(history) -> bool:
    """LLaMA-Factory's "history": a list of [user, assistant] pairs of strings."""
    if not isinstance(history, list):
        return False
    for pair in history:
        if not isinstance(pair, list) or len(pair) != 2:
            return False
        if not all(isinstance(text, str) for text in pair):
            return False
    return True


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None and key == "input":  # optional: absent or null means empty
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {key!r} must be a string, got {json_type(value)}")
    problem = utf8_problem(value)
    if problem:  # JSON's "\ud800" escapes can spell a lone surrogate
        raise UserError(f"{where}: {key!r} is not valid text ({problem})")
    return value


def _from_sharegpt(record: dict, where: str) -> dict:
    """ShareGPT {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}, with
    an optional "system" beside it (LLaMA-Factory's) or a first "system" message."""
    conversation = _from_messages(record["conversations"], where, key="conversations",
                                  role="from", content="value", roles=SHAREGPT_ROLES)
    if record.get("system") is not None:
        if conversation["system"] is not None:
            raise UserError(f"{where}: a 'system' field and a system message: give one of them")
        conversation["system"] = _string(record, "system", where)
    return conversation


def _from_prompt_completion(record: dict, where: str) -> dict:
    """TRL's {"prompt", "completion"}: two strings (the user's message and the answer), or two
    lists of chat messages (the conversation so far, and the answer)."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return _from_messages(prompt + completion, where, key="prompt' + 'completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        raise UserError(f"{where}: 'prompt' and 'completion' must be both strings or both lists of "
                        f"messages, got {json_type(prompt)} and {json_type(completion)}")
    return {"system": None, "turns": [{"instruction": _string(record, "prompt", where), "input": "",
                                       "output": _string(record, "completion", where)}]}


def _from_messages(messages, where: str, key: str = "messages", role: str = "role",
                   content: str = "content", roles: dict | None = None) -> dict:
    """Chat messages → turns. Roles must go (system), user, assistant, user, assistant, ...: every
    user message gets the answer that follows it, and the answer is what is trained on. `roles`
    maps another format's role names to ours (ShareGPT's "human", "gpt")."""
    roles = roles or {name: name for name in ROLES}
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: '{key}' must be a non-empty array of {{{role}, {content}}} "
                        "objects")
    system = None  # None: no system message (a template may then write its default)
    turns = []
    for number, message in enumerate(messages, 1):
        at = f"{where}: message {number}"
        if not isinstance(message, dict) or role not in message or content not in message:
            raise UserError(f"{at}: expected an object with '{role}' and '{content}'")
        text = _string(message, content, at)
        if message[role] not in roles:
            raise UserError(f"{at}: unknown {role} {message[role]!r} (expected one of: "
                            f"{', '.join(roles)})")
        said_by = roles[message[role]]
        if said_by == "system":
            if number != 1:
                raise UserError(f"{at}: a system message must be the first message")
            system = text
        elif said_by == "user":
            if turns and turns[-1]["output"] is None:
                raise UserError(f"{at}: two user messages in a row (user and assistant must "
                                "alternate)")
            turns.append({"instruction": text, "input": "", "output": None})
        else:
            if not turns or turns[-1]["output"] is not None:
                raise UserError(f"{at}: an assistant message must follow a user message")
            turns[-1]["output"] = text
    if not turns or turns[0]["output"] is None:
        raise UserError(f"{where}: the conversation has no assistant message, so nothing to "
                        "train on")
    if turns[-1]["output"] is None:
        raise UserError(f"{where}: the conversation ends with a user message; the last message "
                        "must be the assistant's answer")
    return {"system": system, "turns": turns}


def split_train_val(records: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A random but reproducible split; both parts keep the file's order."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-split must be in [0, 1), got {val_fraction}")
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) >= 2:
        n_val = min(max(n_val, 1), len(records) - 1)
    if n_val == len(records) == 1:
        raise UserError(f"the data has 1 record and --val-split {val_fraction} puts it in the "
                        "validation set, which leaves none to train on; use --val-split 0, or "
                        "more records")
    val_indices = set(random.Random(seed).sample(range(len(records)), n_val))
    train = [record for index, record in enumerate(records) if index not in val_indices]
    val = [record for index, record in enumerate(records) if index in val_indices]
    return train, val
