"""Reading training data: Alpaca JSON/JSONL, LLaMA-Factory history/system, chat messages → one
normalised shape, which data.py turns into token ids:

    {"system": str | None, "turns": [{"instruction": str, "input": str, "output": str}, ...]}

"system" is None when the record has no system message and "" when it has an explicit empty one:
official chat templates write the two differently (Llama-3 writes an empty system block for "",
ChatML writes the model's default system prompt for None).

Every mistake in a file is a UserError of one line that names the file and the record (or, in
JSON Lines, the line number an editor shows).
"""
import json
import random
from pathlib import Path

from errors import UserError, utf8_problem

ROLES = ("system", "user", "assistant")
JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
                   float: "a number", bool: "a boolean"}


def json_type(value) -> str:
    return JSON_TYPE_NAMES.get(type(value), "null")


def data_file(path) -> Path:
    """`path` as a Path, when it is a file; else a UserError (naming it as the user typed it)."""
    path = Path(path)  # messages name it as the user typed it
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():  # (reading /dev/zero or a pipe would never end)
        raise UserError(f"{path} is not a regular file (a directory, a device or a pipe); data "
                        "is a JSON or JSON Lines file")
    return path


def load_records(path) -> list[dict]:
    """Read Alpaca or chat records from a JSON array or a JSON Lines file, each normalised to the
    shape at the top of this file.

    Accepted records: Alpaca {"instruction", "input" (optional), "output"}, with LLaMA-Factory's
    optional "history": [[user, assistant], ...] (earlier turns) and "system"; or chat
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
    Other keys are ignored.
    """
    path = data_file(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                            f"{e.msg})") from None
        except RecursionError:  # json recurses once per level of [ or {
            raise UserError(f"{path}: not valid JSON here (nested too deeply)") from None
        places = [f"record {number}" for number in range(1, len(items) + 1)]
    else:  # JSON Lines, one record per line: messages name the line, which is what an editor shows
        items, places = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: not valid JSON ({e.msg}); expected a JSON "
                                "array of records or JSON Lines (one object per line)") from None
            except RecursionError:
                raise UserError(f"{path}: line {lineno}: not valid JSON here (nested too "
                                "deeply)") from None
            places.append(f"line {lineno}")
    if not items:
        raise UserError(f"{path}: no records")
    return [normalize_record(item, f"{path}: {place}") for item, place in zip(items, places)]


def normalize_record(record, where: str = "record") -> dict:
    """One raw record (Alpaca, Alpaca + history, or chat messages) → the normalised shape."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object, got {json_type(record)}")
    if "messages" in record:
        return _from_messages(record["messages"], where)
    for key in ("instruction", "output"):
        if key not in record:
            raise UserError(f"{where}: missing key {key!r} (Alpaca records need 'instruction' "
                            "and 'output'; chat records need 'messages')")
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


def _from_messages(messages, where: str) -> dict:
    """Chat messages → turns. Roles must go (system), user, assistant, user, assistant, ...: every
    user message gets the answer that follows it, and the answer is what is trained on."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty array of {{role, content}} "
                        "objects")
    system = None  # None: no system message (a template may then write its default)
    turns = []
    for number, message in enumerate(messages, 1):
        at = f"{where}: message {number}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{at}: expected an object with 'role' and 'content'")
        role = message["role"]
        content = _string(message, "content", at)
        if role not in ROLES:
            raise UserError(f"{at}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if role == "system":
            if number != 1:
                raise UserError(f"{at}: a system message must be the first message")
            system = content
        elif role == "user":
            if turns and turns[-1]["output"] is None:
                raise UserError(f"{at}: two user messages in a row (user and assistant must "
                                "alternate)")
            turns.append({"instruction": content, "input": "", "output": None})
        else:
            if not turns or turns[-1]["output"] is not None:
                raise UserError(f"{at}: an assistant message must follow a user message")
            turns[-1]["output"] = content
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
