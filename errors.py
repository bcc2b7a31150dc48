"""One exception type for mistakes a user can make, and the CLI wrapper that reports them.

A bad path, a malformed record or a mismatched checkpoint is not a bug in this project, so it
should not print a traceback: every script's `main` runs under `run_cli`, which turns a
`UserError` into one line, `error: <message>`, on stderr and exit status 2. Anything else is a
bug and keeps its traceback.
"""
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
