"""One-line errors for the command-line tools: a user's mistake exits with a message, never a traceback."""
import sys, warnings
from contextlib import contextmanager

import torch
from fastai.torch_core import default_device

__all__ = ['UsageError', 'RunError', 'user_errors', 'torch_device']

# fastai's import (fastai.layers and everything above it) calls `torch.jit.script`, which torch 2.14 deprecates with
# a FutureWarning printed at every command's start. Not ours to fix: every entry point imports this module before
# fastai's training modules, so a run starts quietly (setup.cfg filters the same warning for pytest).
warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)


class UsageError(Exception):
    "A flag, path or input that the user can fix; the tools print it on one line and exit 2."


class RunError(Exception):
    "A run that could not go on (it diverged, say); the tools print it on one line and exit 1."


@contextmanager
def user_errors(prog):
    "Turn `UsageError` into `prog: error: …` and exit status 2, as argparse does for bad flags; `RunError` exits 1."
    try: yield
    except (UsageError, RunError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, UsageError) else 1) from None


def torch_device(name=None):
    "The torch device `name` names (default: the GPU if there is one), or a `UsageError` saying why it can't be used."
    if name is None: return default_device()
    try: dev = torch.device(name)
    except RuntimeError: raise UsageError(f'--device {name!r} is not a torch device (try cuda or cpu)') from None
    if dev.type == 'cuda' and not torch.cuda.is_available(): raise UsageError(f'--device {name}: no CUDA GPU is available')
    return dev
