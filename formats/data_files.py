"""Data files as people have them → a list of raw records (dicts), each with where it came from.

    JSON        an array of records, or an object that wraps one ({"data": [...]}, {"train": [...]})
    JSON Lines  one record per line (any file that is not one JSON array or wrapper)
    CSV, TSV    a header row, then one record per row; every cell is a string, an empty one absent
    Parquet     one record per row, through pyarrow (an optional dependency); a null absent
    a folder    every data file in it, in sorted order

What the records say (Alpaca, ShareGPT, ...) is records.py's business, not this file's: here a
record is any value, and `where` names it as an editor or a spreadsheet shows it ("data.csv: row
3", "data.jsonl: line 7"), for records.py's one-line errors.
"""
import csv
import json
from pathlib import Path

from errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")  # what a folder's data files end with
# The arrays a record holds (records.py): an object whose arrays have these names is a record (a
# chat on one line of JSON Lines), not a wrapper around the records.
RECORD_ARRAYS = ("messages", "conversations", "prompt", "completion", "history")


def data_paths(path) -> list[Path]:
    """The files `path` names: itself, or a folder's data files (SUFFIXES), sorted by name."""
    path = Path(path)  # messages name it as the user typed it
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES
                       and not p.name.startswith(".") and p.is_file())
        if not files:
            raise UserError(f"{path} is a folder with no data file in it (files ending in "
                            f"{', '.join(SUFFIXES)})")
        return files
    if not path.is_file():  # (reading /dev/zero or a pipe would never end)
        raise UserError(f"{path} is not a regular file (a device or a pipe); data is a file of "
                        "records (JSON, JSON Lines, CSV, TSV or Parquet) or a folder of them")
    return [path]


def read_items(path: Path) -> tuple[list, list[str]]:
    """(raw records, where each one is) of one data file, by its suffix: Parquet, CSV, TSV, or
    else JSON / JSON Lines (whatever the file is called)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        items = read_parquet(path)
        places = [f"record {number}" for number in range(1, len(items) + 1)]
    else:
        text = read_text(path)
        if suffix in (".csv", ".tsv"):
            items, places = read_csv(path, text, "\t" if suffix == ".tsv" else ",")
        else:
            items, places = read_json(path, text)
    if not items:
        raise UserError(f"{path}: no records")
    return items, [f"{path}: {place}" for place in places]


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def read_json(path: Path, text: str) -> tuple[list, list[str]]:
    """One JSON array, an object wrapping one, or JSON Lines. Messages name a record of an array
    by its number and a record of JSON Lines by its line, which is what an editor shows."""
    start = text.lstrip()[:1]
    if start == "[":
        items = _parse_json(path, text)
        return items, [f"record {number}" for number in range(1, len(items) + 1)]
    if start == "{":  # a wrapper object, or the first line of JSON Lines
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # JSON Lines (or broken: said below)
            whole = None
        if isinstance(whole, dict):
            arrays = [key for key, value in whole.items() if isinstance(value, list)]
            if len(whole) == 1 and arrays and arrays[0] not in RECORD_ARRAYS:
                key = arrays[0]
                items = whole[key]
                return items, [f"{key!r} record {number}" for number in range(1, len(items) + 1)]
            several = len(arrays) > 1 and len(arrays) == len(whole)  # {"train": [], "test": []}
            if several and all(key not in RECORD_ARRAYS for key in arrays):
                raise UserError(f"{path}: an object with several arrays ({', '.join(arrays)}); "
                                "data is one array of records, or an object holding only one")
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
    return items, places


def _parse_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                        f"{e.msg})") from None
    except RecursionError:  # json recurses once per level of [ or {
        raise UserError(f"{path}: not valid JSON here (nested too deeply)") from None


def read_csv(path: Path, text: str, delimiter: str) -> tuple[list, list[str]]:
    """Rows under a header row → {column: cell}. An empty cell is a missing value (as pandas and
    Hugging Face's datasets read it), so an empty "input" or "system" column means none."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # an answer may be long
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    items, places = [], []
    try:
        header = next(reader)
        if len(set(header)) != len(header) or not all(header):
            raise UserError(f"{path}: the header row {header!r} needs a distinct name for every "
                            "column")
        for row in reader:
            row_number = reader.line_num  # (the last line of the row: a cell may hold newlines)
            if not any(row):
                continue
            if len(row) > len(header):
                raise UserError(f"{path}: row {row_number} has {len(row)} cells, the header "
                                f"{len(header)}")
            items.append({column: cell for column, cell in zip(header, row) if cell != ""})
            places.append(f"row {row_number}")
    except csv.Error as e:
        raise UserError(f"{path}: row {reader.line_num}: not valid CSV ({e})") from None
    return items, places


def read_parquet(path: Path) -> list:
    """A Parquet file's rows as dicts; nested columns (lists of messages) as lists and dicts; a
    null is absent, as an empty CSV cell is."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow, which is not installed: "
                        "pip install pyarrow") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a Parquet file pyarrow can read ({reason})") from None
    # a table has every column in every row: a null is a value the record does not have
    return [{key: value for key, value in row.items() if value is not None}
            for row in table.to_pylist()]
