"""Training on top of fastai: the learner, the finder's LRMIN/LRMAX rule, the assignment's one-cycle, several processes."""
import os, random, tempfile, time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import fastai.callback.hook  # noqa: F401  (it patches Learner.summary onto the learners built here)
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import OptimWrapper
from fastai.torch_core import num_distrib

from arch import custom_resnet
from cli import UsageError

__all__ = ['PEAK', 'ScaledCrossEntropy', 'cifar_learner', 'LRFind', 'FinderError', 'find_lrs', 'choose_lrs',
           'suggest', 'describe', 'rng_state', 'set_rng_state', 'one_cycle_kwargs', 'fit_assignment', 'distributed',
           'single_process', 'broadcast']

PEAK = 5 / 24  # the assignment's LR peak: epoch 5 of 24, as a fraction of all training steps


class ScaledCrossEntropy(CrossEntropyLossFlat):
    "Cross-entropy on `scale × logits`: cifar10-fast's Mul(0.125), kept in the loss so the network stays exact."
    def __init__(self, scale=0.125, label_smoothing=0., **kwargs):
        super().__init__(label_smoothing=label_smoothing, **kwargs)
        self.scale = scale

    def __call__(self, inp, targ, **kwargs): return super().__call__(inp * self.scale, targ, **kwargs)
    def activation(self, x): return F.softmax(x * self.scale, dim=-1)  # the assignment's SoftMax, as trained


def cifar_learner(dls, model=None, mom=0.9, wd=5e-4, logit_scale=0.125, label_smoothing=0., path='.', cbs=None):
    "A fastai `Learner` for `custom_resnet` with the cifar10-fast optimizer: SGD, Nesterov momentum, L2 weight decay."
    # cifar10-fast (Page, 2018) reached 94% in 24 epochs on this network with exactly this optimizer:
    # torch SGD, Nesterov momentum 0.9 held constant, and L2 decay 5e-4 on every weight, BN included.
    # fastai's own SGD has no Nesterov, so torch's is wrapped; `moms` pins fastai's momentum schedule flat.
    opt_func = partial(OptimWrapper, opt=torch.optim.SGD, momentum=mom, nesterov=True)
    learn = Learner(dls, model if model is not None else custom_resnet(len(dls.vocab)), opt_func=opt_func,
                    loss_func=ScaledCrossEntropy(logit_scale, label_smoothing), metrics=accuracy, wd=wd,
                    moms=(mom, mom, mom), path=path, model_dir='.', cbs=cbs)
    learn.recorder.train_metrics = True  # fastai's one Recorder, not a second one: that prints every line twice
    return learn


@dataclass
class LRFind:
    "What `find_lrs` found: fastai's four suggestions, the chosen LRMIN and LRMAX, and the finder's curve."
    suggestions: dict
    lr_min: float
    lr_max: float
    rule: str
    lrs: list = field(repr=False, default_factory=list)
    losses: list = field(repr=False, default_factory=list)
    seconds: float = 0.

    def __str__(self): return describe(self.suggestions, self.lr_min, self.lr_max, self.rule)

    def to_json(self):
        "The json-safe summary (no curve; a suggestion the curve could not give is null)."
        sugg = {k: v if _ok(v) else None for k, v in self.suggestions.items()}
        return dict(suggestions=sugg, lr_min=self.lr_min, lr_max=self.lr_max, rule=self.rule, seconds=self.seconds)


def choose_lrs(sugg):
    "LRMIN, LRMAX and the rule's wording, from fastai's four suggestions (minimum, steep, valley, slide)."
    # LRMAX = slide: the largest LR before the loss turns up (0.21 on CIFAR-10 at batch 512, where
    # cifar10-fast's proven peak is 0.4). LRMIN = valley: where the loss starts its long descent (0.0063),
    # so the run starts and ends at an LR that trains, 33x below the peak. See README, "Choosing LRMIN and LRMAX".
    # On short or noisy curves `slide` can land below the descent (or be missing); `minimum` stands in then.
    if _ok(sugg['slide']) and not sugg['slide'] <= sugg['valley']: lr_max, why_max = sugg['slide'], 'slide'
    else: lr_max, why_max = sugg['minimum'], 'minimum (slide missing or below valley)'
    if _ok(sugg['valley']) and sugg['valley'] < lr_max: lr_min, why_min = sugg['valley'], 'valley'
    else: lr_min, why_min = lr_max / 25, 'LRMAX/25 (valley not below LRMAX)'  # fastai's default div
    return lr_min, lr_max, f'LRMIN = {why_min}, LRMAX = {why_max}'


def _ok(lr): return lr == lr and 0 < lr < float('inf')  # positive and not NaN


SUGGESTIONS = {f.__name__: f for f in (minimum, steep, valley, slide)}  # fastai's four, by name


def suggest(lrs, losses, num_it):
    "fastai's four suggestions for a finder curve, each NaN where the curve is too short or too flat for it."
    # Learner.lr_find's own trimming (the first tenth, the last 5 points, anything after a NaN). We call the
    # functions ourselves because lr_find fails outright when one does: `slide` needs 16 points.
    lrs, losses = torch.tensor(lrs[num_it // 10:-5]), torch.tensor(losses[num_it // 10:-5])
    nan = torch.isnan(losses).nonzero()
    if len(nan): lrs, losses = lrs[:nan[0, 0]], losses[:nan[0, 0]]
    out = {}
    for name, f in SUGGESTIONS.items():
        try: out[name] = float(f(lrs, losses, num_it)[0])
        except (IndexError, ValueError, RuntimeError): out[name] = float('nan')
    return out


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


def find_lrs(learn, num_it=100, start_lr=1e-7, end_lr=10, rule=choose_lrs):
    "Run fastai's `lr_find`, pick LRMIN and LRMAX with `rule`, and leave `learn` exactly as it was before."
    # fastai restores the weights itself, but not the optimizer's absence, the recorder or the random
    # streams, and its optimizer state has leaked into later fits before (fastai #3013, #2892).
    weights = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    rng, opt, path = rng_state(learn), learn.opt, learn.path
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:  # lr_find saves a snapshot under learn.path
            learn.path = Path(tmp)
            learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it, show_plot=False, suggest_funcs=None)
        lrs, losses = [float(v) for v in learn.recorder.lrs], [float(v) for v in learn.recorder.losses]
    finally:
        learn.path, learn.opt = path, opt
        learn.model.load_state_dict(weights)
        set_rng_state(learn, rng)
        learn.recorder.lrs, learn.recorder.losses, learn.recorder.values, learn.recorder.iters = [], [], [], []
    sugg = suggest(lrs, losses, num_it)
    lr_min, lr_max, why = rule(sugg)
    if not (_ok(lr_min) and _ok(lr_max)):
        raise FinderError(f'lr_find could not choose LRs from its curve ({describe(sugg)}); pass --lr-min and '
                          '--lr-max, or give the finder more steps (--find-iters) or more data (--subset)')
    return LRFind(sugg, float(lr_min), float(lr_max), why, lrs, losses, time.perf_counter() - start)


class FinderError(UsageError):
    "The finder's curve was too short or too flat to choose LRMIN and LRMAX from."


def describe(sugg, lr_min=None, lr_max=None, rule=None):
    "One line for the console: the suggestions and, when given, the chosen LRMIN and LRMAX and why."
    line = ', '.join(f'{k} {v:.3g}' for k, v in sugg.items())
    return line + (f' -> LRMIN {lr_min:.3g}, LRMAX {lr_max:.3g} ({rule})' if lr_max is not None else '')


def one_cycle_kwargs(lr_min, lr_max, pct_start=PEAK):
    "`fit_one_cycle` arguments for the assignment's schedule: LRMIN → LRMAX at `pct_start` → LRMIN, never lower."
    # `div_final` divides lr_max, so div_final = div ends exactly at LRMIN; the design note's div_final=1
    # would hold the LR at LRMAX for the whole second phase (FASTAI_NOTES.md).
    return dict(lr_max=lr_max, div=lr_max / lr_min, div_final=lr_max / lr_min, pct_start=pct_start)


def fit_assignment(learn, epochs, lr_min, lr_max, cbs=None, **kwargs):
    "Train with fastai's `fit_one_cycle` on the assignment's schedule."
    learn.fit_one_cycle(epochs, cbs=cbs, **one_cycle_kwargs(lr_min, lr_max), **kwargs)


# ---- several processes: torchrun / accelerate launch -----------------------------------------------------------

@contextmanager
def distributed(learn):
    "fastai's `distrib_ctx` when launched by torchrun or `accelerate launch`, with its CPU work-arounds; else nothing."
    if num_distrib() <= 1: yield learn; return
    cpu = learn.dls.device.type == 'cpu'
    if cpu: os.environ.setdefault('ACCELERATE_USE_CPU', '1')  # accelerate otherwise looks for a GPU per process
    try:
        with learn.distrib_ctx(sync_bn=not cpu): yield learn  # SyncBatchNorm has no CPU kernel; NCCL GPUs get it
    finally:
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


DistributedDL._broadcast = _broadcast_idxs
