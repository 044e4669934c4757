"""The callbacks of a run: its logs, ETA, divergence stop and checkpoints, and what resuming needs."""
import csv, os, time
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Recorder
from fastai.torch_core import find_bs
from fastcore.basics import noop

from cli import RunError
from rng import rng_state, set_rng_state

__all__ = ['RunLog', 'ETA', 'plain_console', 'Diverged', 'StopOnDivergence', 'Checkpoint', 'load_checkpoint',
           'saved_epoch', 'truncate_logs']


class RunLog(Callback):
    "Appends metrics.csv (a row per epoch) and schedule.csv (a row per step); adds LR and mean loss to fastai's table."
    order = Recorder.order + 1  # after the Recorder has filled its log for the epoch
    # train_loss is fastai's: the smoothed loss at the epoch's end (an exponential average over the last ~50 steps,
    # at the end of the epoch's training). train_loss_mean is the mean over the epoch's steps, the same kind of number
    # as test_loss, so the two can be compared on one curve.
    METRICS = ('epoch', 'lr', 'train_loss', 'train_loss_mean', 'train_acc', 'test_loss', 'test_acc', 'seconds')

    def __init__(self, folder): self.folder = Path(folder)

    def before_fit(self):
        self.recorder.metric_names.insert(1, 'lr')
        self.recorder.metric_names.insert(3, 'train_loss_mean')
        self.rows, self.muted = [], None

    def after_cancel_epoch(self):
        # An epoch fastai skips on resume (`start_epoch`): keep the Recorder's empty row off the console.
        self.muted, self.learn.logger = self.learn.logger, noop

    def before_epoch(self): self.start, self.rows, self.loss_sum, self.n = time.perf_counter(), [], 0., 0

    def after_batch(self):
        if not self.training: return
        step = self.epoch * self.n_iter + self.iter
        self.rows.append((step, round(step / self.n_iter, 6), self.opt.hypers[-1]['lr']))
        bs = find_bs(self.yb)
        self.loss_sum, self.n = self.loss_sum + self.loss.detach().float() * bs, self.n + bs  # on the device: no read

    def after_validate(self):
        # The row reads like the assignment's log: epochs count from 1, with the LR the epoch started at
        # (epoch 1 shows LRMIN; the peak, LRMAX, is where epoch 6 of 24 starts).
        log = self.recorder.log
        log[0] = self.epoch + 1
        log.insert(1, self.rows[0][2] if self.rows else float('nan'))
        log.insert(3, float(self.loss_sum / self.n) if self.n else float('nan'))  # the epoch's one read of it

    def after_epoch(self):
        if self.muted is not None:
            self.learn.logger, self.muted = self.muted, None
            return
        log = self.recorder.log
        self._append('schedule.csv', ('step', 'epoch', 'lr'), self.rows)
        self._append('metrics.csv', self.METRICS, [(*log[:7], round(time.perf_counter() - self.start, 3))])

    def _append(self, name, header, rows):
        f = self.folder / name
        new = not f.exists()
        with open(f, 'a', newline='') as fh:
            w = csv.writer(fh, lineterminator='\n')
            if new: w.writerow(header)
            w.writerows(rows)


class ETA(Callback):
    "Prints the run's expected duration after its first timed batches, and suggests --subset when that is hours."
    order, run_valid = 70, False

    def __init__(self, timed=5, hint='for a quick CPU run, try --subset 5000'): self.timed, self.hint = timed, hint

    def before_fit(self): self.done = False

    def after_batch(self):
        if self.done: return
        if self.iter == 0: self.t0 = time.perf_counter(); return  # the first batch is warm-up
        if self.iter < self.timed and self.iter < self.n_iter - 1: return
        per_batch = (time.perf_counter() - self.t0) / self.iter
        # Validation runs forward only: about a third of a training batch.
        secs = per_batch * (len(self.dls.train) + len(self.dls.valid) / 3) * (self.n_epoch - self.epoch)
        msg = f'ETA: about {_hms(secs)} for {self.n_epoch - self.epoch} epoch(s), {per_batch:.2f} s a batch'
        if secs > 3600: msg += f'; {self.hint}'
        print(msg, flush=True)
        self.done = True


def _hms(secs):
    h, m = divmod(round(secs / 60), 60)
    return f'{h} h {m} min' if h else f'{m} min' if m else f'{round(secs)} s'


def plain_console(learn):
    "Keep fastai's epoch table but drop its progress bars, for logs: fastprogress 1.0 draws bars even into files."
    learn.remove_cb(ProgressCallback)
    learn.logger = _TableRows(learn)


class _TableRows:
    "fastai's console table without a progress bar: a header at the start of each fit, then a row an epoch."
    def __init__(self, learn): self.learn, self.names = learn, None

    def __call__(self, log):
        names = list(self.learn.recorder.metric_names)
        if names != self.names:
            self.names = names
            print('  '.join(f'{n:<8}' for n in names), flush=True)
        cells = [f'{v:.6f}' if isinstance(v, float) else str(v) for v in log]
        print('  '.join(f'{c:<{max(8, len(n))}}' for c, n in zip(cells, names)), flush=True)


class Diverged(RunError):
    "The training loss became NaN or infinite."
    # fastai rewrites the message of an exception raised in a callback; `msg` keeps the one-line original.
    def __init__(self, msg): super().__init__(msg); self.msg = msg


class StopOnDivergence(Callback):
    "Stops training at the first non-finite loss and says where, reading a device-side flag every `every` batches."
    order = -10  # after_loss, before the backward pass and the optimizer step

    # Reading the loss on the host makes the CPU wait for the GPU at every batch. The flag (the first bad step of
    # the window, or -1) stays on the device and is read every `every` batches and at the end of each epoch's
    # training, so a divergence is named exactly, up to `every` - 1 steps late. On a CPU a read costs nothing:
    # there the check is every batch, before the bad step reaches the weights.
    def __init__(self, every=None): self.every = every

    def before_fit(self): self.n = self.every or (1 if self.dls.device.type == 'cpu' else 32)

    def before_train(self): self.first, self.lrs = None, {}

    def after_loss(self):
        if not self.training: return
        bad = ~torch.isfinite(self.loss.detach()).all()
        loss = self.loss.detach().float().mean()
        if self.first is None: self.first, self.first_loss = torch.full_like(loss, -1), loss
        new = bad & (self.first < 0)
        self.first = torch.where(new, self.iter, self.first)  # a Python number, not a tensor: no host-to-device copy
        self.first_loss = torch.where(new, loss, self.first_loss)
        self.lrs[self.iter] = self.opt.hypers[-1]['lr']
        if (self.iter + 1) % self.n == 0: self._check()

    def after_train(self): self._check()

    def _check(self):
        if self.first is None: return
        shown = getattr(self.learn, 'smooth_loss', None)  # the Recorder's, kept on the device (train.DeviceSmoothLoss)
        if shown is None: step = int(self.first)  # the one read of the window
        else:  # the one read of the window: the flag, and the smoothed loss for the progress bar (train.LeanProgress)
            step, self.learn.shown_loss = torch.stack([self.first, shown.to(self.first)]).tolist()
            step = int(step)
        if step >= 0:
            raise Diverged(f'training diverged: the loss became {float(self.first_loss)} at epoch {self.epoch + 1}, '
                           f'step {step + 1} (LR {self.lrs[step]:.3g}); try a lower --lr-max')
        self.first, self.lrs = None, {}


class Checkpoint(Callback):
    "After each epoch, saves model, optimizer, epochs done and every random stream to one file, atomically."
    order = RunLog.order + 1  # after the epoch's rows are in metrics.csv

    def __init__(self, path, resumed=None, **extra): self.path, self.resumed, self.extra = Path(path), resumed, extra

    def before_fit(self):
        # The Recorder has just reset its smoothed loss; a resumed run carries on the killed run's smoothing,
        # so its train_loss column matches an uninterrupted run's too.
        if self.resumed: self.recorder.smooth_loss.count, self.recorder.smooth_loss.val = self.resumed['smooth']

    def after_cancel_epoch(self): self.skipped = True

    def after_epoch(self):
        if getattr(self, 'skipped', False): self.skipped = False; return
        sm, model = self.recorder.smooth_loss, getattr(self.model, 'module', self.model)  # unwrap DDP
        state = dict(epoch=self.epoch + 1, model=model.state_dict(), opt=self.opt.state_dict(),
                     rng=rng_state(self.learn), smooth=(sm.count, sm.val), **self.extra)
        tmp = self.path.with_suffix('.tmp')
        torch.save(state, tmp)
        os.replace(tmp, self.path)  # a kill mid-save leaves the previous checkpoint whole


def load_checkpoint(learn, path):
    "Put a `Checkpoint` back into `learn` (weights, optimizer, random streams); returns the saved dict."
    # On the CPU: torch.set_rng_state takes CPU tensors only; weights and optimizer state follow their parameters.
    state = torch.load(path, map_location='cpu', weights_only=False)
    learn.model.load_state_dict(state['model'])
    # The model goes to the training device before the optimizer is made: torch's load_state_dict puts each state
    # tensor (the momentum buffers) on its parameter's device, and fastai's own move in before_fit moves only the
    # parameters, so buffers loaded beside a CPU model would stay there and the first GPU step would fail.
    learn.model.to(learn.dls.device)
    learn.create_opt()
    learn.opt.load_state_dict(state['opt'])
    set_rng_state(learn, state['rng'])
    return state


def saved_epoch(path):
    "How many epochs the `Checkpoint` at `path` holds: 0 when there is none yet."
    return torch.load(path, map_location='cpu', weights_only=False)['epoch'] if Path(path).exists() else 0


def truncate_logs(folder, epochs, steps_per_epoch):
    "Cut metrics.csv and schedule.csv back to `epochs` finished epochs, so a resumed run logs each epoch once."
    for name, keep in (('metrics.csv', epochs), ('schedule.csv', epochs * steps_per_epoch)):
        f = Path(folder) / name
        if not f.exists(): continue
        lines = f.read_text().splitlines(keepends=True)
        tmp = f.with_suffix('.tmp')
        tmp.write_text(''.join(lines[:keep + 1]))  # the header and the rows to keep
        os.replace(tmp, f)
