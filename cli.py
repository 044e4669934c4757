"""One-line errors for the command-line tools: a user's mistake exits with a message, never a traceback."""
import sys
from contextlib import contextmanager

__all__ = ['UsageError', 'user_errors']


class UsageError(Exception):
    "A flag, path or input that the user can fix; the tools print it on one line and exit 2."


@contextmanager
def user_errors(prog):
    "Turn `UsageError` into `prog: error: …` on stderr and exit status 2, as argparse does for bad flags."
    try: yield
    except UsageError as e:
        print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(2) from None
