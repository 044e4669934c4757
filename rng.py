"""Repeatable runs: every random stream a fit draws from, saved and rewound, and cuDNN's choice of algorithms."""
import random

import numpy as np
import torch

__all__ = ['rng_state', 'set_rng_state', 'use_cudnn']


def use_cudnn(deterministic):
    "cuDNN's benchmark search by default (the fastest algorithms for these shapes); fixed, repeatable ones on request."
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = not deterministic, deterministic


def rng_state(learn):
    "Every random stream a fit draws from: Python, NumPy, torch (CPU and CUDA) and each DataLoader's own."
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            [_unwrap(dl).rng.getstate() for dl in learn.dls.loaders])


def _unwrap(dl): return getattr(dl, 'dl', dl)  # the loader inside fastai's DistributedDL


def set_rng_state(learn, state):
    "Rewind every random stream to what `rng_state` returned."
    py, npy, cpu, cuda, dls = state
    random.setstate(py); np.random.set_state(npy); torch.set_rng_state(cpu)
    # A run resumed on another machine may have fewer GPUs, or none: each GPU present gets its saved stream.
    if cuda is not None and torch.cuda.is_available():
        for i, s in enumerate(cuda[:torch.cuda.device_count()]): torch.cuda.set_rng_state(s, i)
    for dl, s in zip(learn.dls.loaders, dls): _unwrap(dl).rng.setstate(s)
