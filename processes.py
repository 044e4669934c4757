"""Several processes (torchrun, accelerate): `distrib_ctx` with CPU work-arounds, and what one process does alone."""
import os
from contextlib import contextmanager

import torch
from fastai.torch_core import num_distrib

from cli import UsageError

__all__ = ['distributed', 'single_process', 'broadcast']


@contextmanager
def distributed(learn):
    "fastai's `distrib_ctx` when launched by torchrun or `accelerate launch`, with its CPU work-arounds; else nothing."
    if num_distrib() <= 1: yield learn; return
    # Imported here, not at the top: fastai.distributed needs accelerate, which only the [dist] extra installs, and
    # a single-process run (the README's first command, on a plain `pip install -e .`) must not need it.
    try: from fastai.distributed import DistributedDL
    except (ImportError, NameError) as e:  # without accelerate, fastai's module fails with a NameError
        raise UsageError("several processes need accelerate: pip install -e '.[dist]'") from e
    cpu, env = learn.dls.device.type == 'cpu', os.environ.get('ACCELERATE_USE_CPU')
    if cpu: os.environ.setdefault('ACCELERATE_USE_CPU', '1')  # accelerate otherwise looks for a GPU per process
    fastai_broadcast, DistributedDL._broadcast = DistributedDL._broadcast, _broadcast_idxs  # only while we train here
    try:
        with learn.distrib_ctx(sync_bn=not cpu): yield learn  # SyncBatchNorm has no CPU kernel; NCCL GPUs get it
    finally:
        DistributedDL._broadcast = fastai_broadcast
        # the environment as it was: a later fit may be on a GPU
        if env is None: os.environ.pop('ACCELERATE_USE_CPU', None)
        else: os.environ['ACCELERATE_USE_CPU'] = env
        if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()


@contextmanager
def single_process():
    "Work one process does alone under torchrun (its own lr_find, rank 0's figures): fastai reads WORLD_SIZE to decide."
    # Otherwise fastai gathers every prediction across processes that are not taking part.
    saved = {k: os.environ.get(k) for k in ('WORLD_SIZE', 'RANK')}
    os.environ.update(WORLD_SIZE='1', RANK='0')
    try: yield
    finally:
        for k, v in saved.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


def broadcast(obj):
    "`obj` as rank 0 has it, on every rank (the LRs rank 0's finder chose, say); `obj` itself when not distributed."
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()): return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _broadcast_idxs(self, t, rank):
    "fastai's `DistributedDL._broadcast` on the process group's own device: it calls .cuda(), which gloo can't use."
    gpu = torch.distributed.get_backend() == 'nccl'
    t = torch.tensor([int(i) for i in t], dtype=torch.long, device='cuda' if gpu else 'cpu')
    torch.distributed.broadcast(t, rank)
    return t.cpu().tolist()
