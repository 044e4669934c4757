"""A run, live in TensorBoard (`tensorboard --logdir runs`): LR and smoothed loss per step, epoch metrics, figures."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image
# Needs the [tensorboard] extra; only run.py --tensorboard imports this module.
from fastai.callback.tensorboard import TensorBoardCallback
from torch.utils.tensorboard import SummaryWriter

__all__ = ['SUBDIR', 'EPOCH_SCALARS', 'TensorBoardLog', 'log_figures']

SUBDIR = 'tensorboard'  # inside the run folder, so `tensorboard --logdir runs` shows every run by its folder
# fastai's Recorder columns → the names metrics.csv gives them
EPOCH_SCALARS = {'train_loss': 'train_loss', 'train_loss_mean': 'train_loss_mean', 'train_accuracy': 'train_acc',
                 'valid_loss': 'test_loss', 'valid_accuracy': 'test_acc'}


class TensorBoardLog(TensorBoardCallback):
    "fastai's `TensorBoardCallback`, writing each step's LR and smoothed loss at its epoch's end, and epoch metrics."
    # fastai's own writes the smoothed loss at every step: a host read of the device at every batch. Here the
    # step's values stay on the device and are written together when the epoch ends, in one read.
    def __init__(self, log_dir): super().__init__(log_dir, trace_model=False, log_preds=False)

    def before_epoch(self): self.steps = []

    def after_batch(self):
        if self.training: self.steps.append((self.train_iter, self.opt.hypers[-1]['lr'], self.smooth_loss))

    def after_epoch(self):
        if not (self.run and self.steps): return  # an epoch skipped on --resume trained nothing
        losses = torch.stack([loss for *_, loss in self.steps]).tolist()
        for (step, lr, _), loss in zip(self.steps, losses):
            self.writer.add_scalar('step/lr', lr, step)
            self.writer.add_scalar('step/train_loss_smoothed', loss, step)
        names, log = list(self.recorder.metric_names), self.recorder.log
        for fastai_name, ours in EPOCH_SCALARS.items():
            self.writer.add_scalar(f'epoch/{ours}', log[names.index(fastai_name)], self.epoch + 1)
        self.writer.flush()


def log_figures(folder, names=('lr_find', 'schedule', 'curves', 'confusion', 'misclassified', 'receptive_field')):
    "Add a finished run's figures (its PNGs) to its TensorBoard log, under `figures/`."
    folder = Path(folder)
    with SummaryWriter(folder / SUBDIR) as w:
        for name in names:
            if (png := folder / f'{name}.png').exists():
                w.add_image(f'figures/{name}', np.asarray(Image.open(png).convert('RGB')), dataformats='HWC')
