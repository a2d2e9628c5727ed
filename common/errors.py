"""The error users see: a FeddemError carries a message that names what is wrong, shown without a traceback; and
how a command-line program turns it (and Ctrl-C) into its exit code (`run_command`)."""

import sys
from collections.abc import Callable

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


class FeddemError(Exception):
    """A problem with the user's input or configuration, or a failed run, explained in words."""


def run_command(prog: str, command: Callable[[], int | None]) -> int:
    """Run a program's command: its own exit code (None: `EXIT_OK`); a FeddemError is printed as `prog: error: ...`
    (no traceback) and exits `EXIT_USAGE`, Ctrl-C prints `prog: interrupted` and exits `EXIT_INTERRUPTED`."""
    try:
        code = command()
    except FeddemError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else code
