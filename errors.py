"""One exception type for mistakes a user can make, and the CLI wrapper that reports them.

A bad path, a malformed record or a mismatched checkpoint is not a bug in this project, so it
should not print a traceback: every script's `main` runs under `run_cli`, which turns a
`UserError` into one line, `error: <message>`, on stderr and exit status 2. Anything else is a
bug and keeps its traceback.

The command-line helpers below keep that promise for flags too: `ArgumentParser` reports a bad
flag as a UserError (argparse would print its usage block first), and the checks `positive_int`,
`fraction`, `device_name`, ... are argparse `type=` functions that any script can share.
"""
import argparse
import errno
import math
import sys


class UserError(Exception):
    """Raised for anything the user can fix: wrong path, bad data, mismatched checkpoint."""


def run_cli(main, argv=None):
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---------------------------------------------------------------- text

def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8, which every tokenizer reads, or None. Python holds
    such text with a lone surrogate: a byte that was not UTF-8 on the command line (decoded as
    U+DC80..U+DCFF, "surrogateescape"), or a JSON escape such as "\\ud800"."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        if 0xDC80 <= char <= 0xDCFF:
            return f"character {e.start + 1} is the byte {char - 0xDC00:#x}, which is not UTF-8"
        return f"character {e.start + 1} is a lone surrogate, U+{char:04X}"


# ---------------------------------------------------------------- a full disk

# What torch.save raises when its writer fails: it does not say why, and on a local disk the
# reason is almost always that the disk is full.
TORCH_FAILED_WRITE = ("unexpected pos", "file write failed", "iostream error")


def disk_full_cause(e: BaseException) -> str | None:
    """How to name a failed write that ran out of space, or None if `e` is something else.
    Python raises OSError(ENOSPC); safetensors says "os error 28" (ENOSPC) in its message."""
    if isinstance(e, OSError) and e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device"
    if f"os error {errno.ENOSPC})" in str(e):
        return "no space left on device"
    if isinstance(e, RuntimeError) and any(text in str(e) for text in TORCH_FAILED_WRITE):
        first_line = str(e).strip().splitlines()[0]
        return f"a write failed, most likely for lack of disk space (torch: {first_line})"
    return None


# ---------------------------------------------------------------- command-line flags

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag is a UserError (one line under run_cli, not
    argparse's usage block), and --help shows every flag's default (HelpFormatter)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        raise UserError(message)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and "(default: X)" after each flag's help. A flag whose
    default is None says in its own help what leaving it out means; a switch is off by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"  # argparse fills in %(default)s


def _number(text: str, kind, rule: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count or a size: an integer >= 1 (0 would mean nothing happens, or a division by zero)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (where 0 means "none" or "off")."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0, such as a learning rate (float() also accepts "nan" and "inf")."""
    value = _number(text, float, "a number > 0")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (float() also accepts "nan" and "inf")."""
    value = _number(text, float, "a number >= 0")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63), which every generator takes (torch's stops at
    64 bits, and ranks add their index to it)."""
    value = _number(text, int, "an integer in [0, 2**63)")
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def fraction(text: str) -> float:
    """A probability mass such as top-p: in (0, 1]."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def fraction_below_one(text: str) -> float:
    """A share of something that must leave some over, such as a validation split: in [0, 1)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def text_checked_by(parse):
    """argparse's type= for a flag whose text `parse` checks (raising "--flag TEXT: why"): the
    text as typed (config.json records it), once `parse` accepts it; else argparse's one line."""
    def checked(text: str) -> str:
        try:
            parse(text)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
        return text
    return checked


def device_name(text: str) -> str:
    """A device string torch understands and this machine has: cpu, cuda, cuda:N or mps."""
    import torch  # here, so that errors.py stays importable without the weight of torch
    wrong = argparse.ArgumentTypeError
    try:
        kind = torch.device(text)
    except RuntimeError:
        raise wrong(f"{text!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise wrong(f"{text}: this machine has no CUDA GPU (use --device cpu)")
    gpus = torch.cuda.device_count() if kind.type == "cuda" else 0
    if kind.type == "cuda" and (kind.index or 0) >= gpus:
        raise wrong(f"{text}: this machine has {gpus} CUDA GPU(s), cuda:0 to cuda:{gpus - 1}")
    if kind.type == "mps" and not torch.backends.mps.is_available():
        raise wrong(f"{text}: this machine has no Apple GPU (use --device cpu)")
    if kind.type not in ("cpu", "cuda", "mps"):
        raise wrong(f"{text}: only cpu, cuda and mps are supported")
    return text


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"
