"""Training on top of fastai: the learner, the assignment's one-cycle, random streams, several processes."""
import os, platform, random, warnings
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
import fastai.callback.schedule  # noqa: F401  (and Learner.fit_one_cycle, Learner.lr_find)
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import OptimWrapper
from fastai.torch_core import find_bs, num_distrib
from fastcore.basics import PrettyString

from arch import custom_resnet, model_summary
from cli import UsageError

__all__ = ['PEAK', 'PRECISIONS', 'cpu_bf16_unit', 'auto_precision', 'concrete_precision', 'device_name', 'ScaledCrossEntropy', 'CifarLearner',
           'cifar_learner', 'BF16', 'ChannelsLastBatches',
           'DeviceAvgMetric', 'DeviceAvgLoss', 'DeviceSmoothLoss', 'HostLosses', 'LeanProgress', 'use_cudnn',
           'rng_state', 'set_rng_state', 'one_cycle_kwargs', 'fit_assignment', 'distributed', 'single_process', 'broadcast']

PEAK = 5 / 24  # the assignment's LR peak: epoch 5 of 24, as a fraction of all training steps


class ScaledCrossEntropy(CrossEntropyLossFlat):
    "Cross-entropy on `scale × logits`: cifar10-fast's Mul(0.125), kept in the loss so the network stays the assignment's."
    def __init__(self, scale=0.125, label_smoothing=0., **kwargs):
        super().__init__(label_smoothing=label_smoothing, **kwargs)
        self.scale = scale

    def __call__(self, inp, targ, **kwargs): return super().__call__(inp * self.scale, targ, **kwargs)
    def activation(self, x): return F.softmax(x * self.scale, dim=-1)  # the assignment's SoftMax, as trained


PRECISIONS = ('auto', 'fp32', 'bf16')


def cpu_bf16_unit():
    "The unit this CPU runs bf16 arithmetic on natively, 'AMX' or 'AVX-512 BF16', or None."
    # torch reads the CPUID flags (amx_tile, avx512_bf16 in /proc/cpuinfo); without one of them oneDNN emulates bf16
    # in fp32 units, slower than fp32 itself.
    if not torch.backends.mkldnn.is_available(): return None
    if torch.cpu._is_amx_tile_supported(): return 'AMX'
    if torch.cpu._is_avx512_bf16_supported(): return 'AVX-512 BF16'
    return None


def device_name(device):
    "The GPU's name, or the CPU's model name with its core count (from /proc/cpuinfo where there is one)."
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    if device.type != 'cpu': return device.type
    try: model = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): model = platform.processor() or 'CPU'
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return f'{model}, {cores} cores'


def auto_precision(device):
    "`(precision, channels_last, why)` for `device`: bf16 autocast and channels-last where it runs bf16 natively, else fp32."
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False): return 'bf16', True, f'{name} runs bf16 natively'
        return 'fp32', False, f'{name} has no native bf16'
    if device.type == 'cpu':
        unit = cpu_bf16_unit()
        if unit: return 'bf16', True, f'this CPU has {unit}'
        return 'fp32', False, 'this CPU has neither AMX nor AVX-512 BF16'
    return 'fp32', False, f'bf16 on {device.type} is not known to be native'


def concrete_precision(precision, channels_last, device):
    "`(precision, channels_last, why)` as training uses them: 'auto' made concrete by `auto_precision`, the rest as asked."
    if precision != 'auto': return precision, channels_last, 'as asked'
    precision, native_layout, why = auto_precision(device)
    return precision, channels_last or native_layout, f'auto: {why}'


class CifarLearner(Learner):
    "fastai's `Learner`, whose `summary()` is the assignment's table (`arch.model_summary`) rather than fastai's own."
    # PrettyString, as fastai's summary returns: a notebook shows the table as printed text, not a quoted repr.
    def summary(self): return PrettyString(model_summary(self.model))


def cifar_learner(dls, model=None, mom=0.9, wd=5e-4, logit_scale=0.125, label_smoothing=0., path='.', cbs=None,
                  precision='fp32', channels_last=False):
    "A fastai `Learner` for `custom_resnet` with the cifar10-fast optimizer: SGD, Nesterov momentum, L2 weight decay."
    # precision: 'fp32', 'bf16' (autocast), or 'auto': bf16 and channels-last where `dls.device` runs bf16 natively.
    # cifar10-fast (Page, 2018) reached 94% in 24 epochs with this optimizer, on a near twin of this network (it pools
    # after BN and ReLU, the assignment before) and a piecewise-linear schedule to 0 (ours is cosine, back to LRMIN):
    # torch SGD, Nesterov momentum 0.9 held constant, and L2 decay 5e-4 on every weight, BN included.
    # fastai's own SGD has no Nesterov, so torch's is wrapped; `moms` pins fastai's momentum schedule flat.
    # `weight_decay` is set at build time too, so the optimizer is the recipe's from `create_opt()` on, not from `fit`.
    if precision not in PRECISIONS: raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    precision, channels_last, _ = concrete_precision(precision, channels_last, dls.device)
    opt_func = partial(OptimWrapper, opt=torch.optim.SGD, momentum=mom, nesterov=True, weight_decay=wd)
    learn = CifarLearner(dls, model if model is not None else custom_resnet(len(dls.vocab)), opt_func=opt_func,
                         loss_func=ScaledCrossEntropy(logit_scale, label_smoothing), metrics=DeviceAvgMetric(accuracy),
                         wd=wd,
                         # BN weights decay too, as in cifar10-fast. torch's SGD decays every parameter whatever this
                         # says (fastai's `False` only writes a `do_wd` flag that torch never reads); saying `True` keeps
                         # BN decayed if fastai's own SGD, which does read the flag, is ever swapped in.
                         wd_bn_bias=True,
                         moms=(mom, mom, mom), path=path, model_dir='.', cbs=cbs)
    rec = learn.recorder
    rec.train_metrics = True  # fastai's one Recorder, not a second one: that prints every line twice
    # fastai's Recorder, its columns and its numbers, with the sums kept on the device (read once an epoch).
    rec.loss, rec.smooth_loss = DeviceAvgLoss(), DeviceSmoothLoss(beta=rec.smooth_loss.beta)
    learn.remove_cb(ProgressCallback).add_cbs([LeanProgress(), HostLosses()])
    # Not fastai's `to_channelslast()`: it adds an fp16 MixedPrecision unless told otherwise, and its kwargs go to
    # GradScaler, so `to_channelslast(to_fp16=False)` fails in before_fit with a TypeError (FASTAI_NOTES.md).
    if channels_last: learn.add_cb(ChannelsLastBatches())
    if precision == 'bf16': learn.add_cb(BF16())
    return learn


class BF16(MixedPrecision):
    "fastai's bf16 `MixedPrecision` (no loss scaling, no host sync) with autocast on the learner's own device."
    def __init__(self): super().__init__(amp_mode=AMPMode.BF16)

    def before_fit(self):
        # fastai hard-codes CUDA autocast, which on a CPU warns and trains in fp32: its warning is about the autocast
        # replaced on the next line, so it is not shown.
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='CUDA is not available', category=UserWarning)
            super().before_fit()
        self.autocast = torch.autocast(self.dls.device.type, dtype=torch.bfloat16)


class ChannelsLastBatches(ChannelsLast):
    "fastai's `ChannelsLast`, which converts the model only, and each batch converted once as it reaches the model."
    # Otherwise every batch arrives in NCHW and the first convolution converts it, a hidden copy a batch.
    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in self.xb)


# ---- no host read in a training batch ----------------------------------------------------------------------------
# fastai's AvgMetric, AvgLoss and AvgSmoothLoss call `to_detach(..., cpu=True)`, a `.cpu()` of a one-number tensor,
# at every batch: on a GPU each one waits for all the work queued before it. These keep the same sums on the
# device (the same operations, so the same numbers) and fastai's Recorder reads them once, at the epoch's end.

class DeviceAvgMetric(AvgMetric):
    "fastai's `AvgMetric`, summed on the device."
    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += learn.to_detach(self.func(learn.pred, *learn.yb), cpu=False) * bs
        self.count += bs


class DeviceAvgLoss(AvgLoss):
    "fastai's `AvgLoss` (the validation loss), summed on the device."
    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total += learn.to_detach(learn.loss.mean(), cpu=False) * bs
        self.count += bs


class DeviceSmoothLoss(AvgSmoothLoss):
    "fastai's `AvgSmoothLoss` (the training loss it shows), kept on the device."
    def accumulate(self, learn):
        self.count += 1
        loss = learn.to_detach(learn.loss.mean(), cpu=False)
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)  # .to: once a fit, from reset's CPU zero


class HostLosses(Callback):
    "Moves the Recorder's per-batch smoothed losses to the host in one read an epoch (lr_find and plot_loss read them)."
    order = Recorder.order + 1

    def before_fit(self): self.done = 0
    def after_train(self): self._to_host()
    def after_fit(self): self._to_host()  # lr_find stops mid-epoch, with no after_train

    def _to_host(self):
        losses = self.recorder.losses
        if len(losses) > self.done: losses[self.done:] = list(torch.stack(losses[self.done:]).cpu())
        self.done = len(losses)


class LeanProgress(ProgressCallback):
    "fastai's progress bars, showing the smoothed loss as the divergence check last read it: fastai reads it every batch."
    @property
    def name(self): return 'progress'  # where fastai's own bar is found: `learn.progress`

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        # `shown_loss` is a Python float, set by `callbacks.StopOnDivergence` in its periodic read of the device.
        if self.training and getattr(self.learn, 'shown_loss', None) is not None:
            self.pbar.comment = f'{self.learn.shown_loss:.4f}'


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
        if env is None: os.environ.pop('ACCELERATE_USE_CPU', None)  # the environment as it was: a later fit may be on a GPU
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
