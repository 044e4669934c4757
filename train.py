"""Training on top of fastai: the learner (its loss, metrics and progress), and the assignment's one-cycle schedule."""
from functools import partial

import torch
import torch.nn.functional as F
import fastai.callback.schedule  # noqa: F401  (and Learner.fit_one_cycle, Learner.lr_find)
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgLoss, AvgMetric, AvgSmoothLoss, Learner, Recorder
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import OptimWrapper
from fastai.torch_core import find_bs
from fastcore.basics import PrettyString

from arch import custom_resnet, model_summary
from precision import BF16, PRECISIONS, ChannelsLastBatches, concrete_precision

__all__ = ['PEAK', 'ScaledCrossEntropy', 'CifarLearner', 'cifar_learner', 'DeviceAvgMetric', 'DeviceAvgLoss',
           'DeviceSmoothLoss', 'HostLosses', 'LeanProgress', 'one_cycle_kwargs', 'fit_assignment']

PEAK = 5 / 24  # the assignment's LR peak: epoch 5 of 24, as a fraction of all training steps


class ScaledCrossEntropy(CrossEntropyLossFlat):
    "Cross-entropy on `scale × logits`: cifar10-fast's Mul(0.125), in the loss so the network stays the assignment's."
    def __init__(self, scale=0.125, label_smoothing=0., **kwargs):
        super().__init__(label_smoothing=label_smoothing, **kwargs)
        self.scale = scale

    def __call__(self, inp, targ, **kwargs): return super().__call__(inp * self.scale, targ, **kwargs)
    def activation(self, x): return F.softmax(x * self.scale, dim=-1)  # the assignment's SoftMax, as trained


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
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    precision, channels_last, _ = concrete_precision(precision, channels_last, dls.device)
    opt_func = partial(OptimWrapper, opt=torch.optim.SGD, momentum=mom, nesterov=True, weight_decay=wd)
    learn = CifarLearner(dls, model if model is not None else custom_resnet(len(dls.vocab)), opt_func=opt_func,
                         loss_func=ScaledCrossEntropy(logit_scale, label_smoothing), metrics=DeviceAvgMetric(accuracy),
                         wd=wd,
                         # BN weights decay too, as in cifar10-fast. torch's SGD decays every parameter whatever this
                         # says (fastai's `False` only writes a `do_wd` flag that torch never reads); saying `True`
                         # keeps BN decayed if fastai's own SGD, which does read the flag, is ever swapped in.
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
    "fastai's progress bars, with the smoothed loss as the divergence check last read it: fastai reads it every batch."
    @property
    def name(self): return 'progress'  # where fastai's own bar is found: `learn.progress`

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        # `shown_loss` is a Python float, set by `callbacks.StopOnDivergence` in its periodic read of the device.
        if self.training and getattr(self.learn, 'shown_loss', None) is not None:
            self.pbar.comment = f'{self.learn.shown_loss:.4f}'


def one_cycle_kwargs(lr_min, lr_max, pct_start=PEAK):
    "`fit_one_cycle` arguments for the assignment's schedule: LRMIN → LRMAX at `pct_start` → LRMIN, never lower."
    # `div_final` divides lr_max, so div_final = div ends exactly at LRMIN; the design note's div_final=1
    # would hold the LR at LRMAX for the whole second phase (FASTAI_NOTES.md).
    return dict(lr_max=lr_max, div=lr_max / lr_min, div_final=lr_max / lr_min, pct_start=pct_start)


def fit_assignment(learn, epochs, lr_min, lr_max, cbs=None, **kwargs):
    "Train with fastai's `fit_one_cycle` on the assignment's schedule."
    learn.fit_one_cycle(epochs, cbs=cbs, **one_cycle_kwargs(lr_min, lr_max), **kwargs)
