"""What every command shares: one-line errors (a user's mistake exits with a message, no traceback), a quiet start."""
import os, signal, sys, threading, warnings
from contextlib import contextmanager

import torch
from fastai.torch_core import default_device

__all__ = ['quiet_warnings', 'UsageError', 'RunError', 'Interrupted', 'user_errors', 'on_interrupt', 'torch_device']


def quiet_warnings():
    "Hide fastai's import-time FutureWarning about `torch.jit.script` (deprecated in torch 2.14): not ours to fix."
    # fastai.layers calls `torch.jit.script` while it is imported, so a command calls this before its first import
    # of fastai's training modules, not in its main (the warning would be printed by then). setup.cfg filters the same
    # warning for pytest; a notebook or a REPL filters it itself (experiments/walkthrough.ipynb does).
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)


class UsageError(Exception):
    "A flag, path or input that the user can fix; the tools print it on one line and exit 2."


class RunError(Exception):
    "A run that could not go on (it diverged, say); the tools print it on one line and exit 1."


class Interrupted(Exception):
    "A Ctrl-C, with what it stopped, what is kept and how to go on; the tools print it on one line and exit 130."


@contextmanager
def on_interrupt(say):
    "Turn a Ctrl-C inside the block into `Interrupted(say())`; `say` may tidy up before it describes what is kept."
    try: yield
    except KeyboardInterrupt: raise Interrupted(say()) from None


@contextmanager
def user_errors(prog):
    "`UsageError` as `prog: error: …` and exit 2, as argparse does; `RunError` exits 1; a Ctrl-C is one line and 130."
    # The first Ctrl-C raises KeyboardInterrupt where the program is, so that it can say what it stopped and keep
    # what is done; a second one, while it does so, ends the process at once.
    def again(signum, frame):
        os.write(2, f'{prog}: interrupted again; stopped at once\n'.encode())
        os._exit(130)

    def first(signum, frame):
        signal.signal(signal.SIGINT, again)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    if main: previous = signal.signal(signal.SIGINT, first)
    try: yield
    except (UsageError, RunError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, UsageError) else 1) from None
    except (Interrupted, KeyboardInterrupt) as e:
        print(f'{prog}: {e or "interrupted"}', file=sys.stderr, flush=True)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
    finally:
        if main: signal.signal(signal.SIGINT, previous)


def torch_device(name=None):
    "The torch device `name` names (default: the GPU if there is one), or a `UsageError` saying why it can't be used."
    if name is None: return default_device()
    try: dev = torch.device(name)
    except RuntimeError: raise UsageError(f'--device {name!r} is not a torch device (try cuda or cpu)') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: no CUDA GPU is available')
    return dev
