"""The GPU path's speed settings, checked on a CPU: no host read per batch, bf16 autocast, channels-last, the flags."""
import collections, json, traceback

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_folder, run_here, run_script
from data import cifar_dls
from callbacks import Diverged, RunLog, StopOnDivergence
from train import BF16, LeanProgress, cifar_learner, fit_assignment


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "4 training images a class: 8 batches of 5 an epoch."
    return make_folder(tmp_path_factory.mktemp('speed') / 'data', n_train=4, n_test=1)


def learner(folder, **kwargs):
    set_seed(0)
    return cifar_learner(cifar_dls(folder, bs=5, device='cpu', seed=0, verbose=False), **kwargs)


class HostReads(TorchDispatchMode):
    "Counts reads of a tensor's value by the host (.item(), bool(), float(), formatting): on a GPU, each waits for it."
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if '/torch/' not in f.filename]
            # fastai's schedule does its position arithmetic on CPU tensors whatever the device: no GPU wait
            if not frames[-1].filename.endswith('fastai/callback/schedule.py'):
                self.sites[f'{frames[-1].filename}:{frames[-1].lineno}'] += 1
        return func(*args, **(kwargs or {}))


class WatchTraining(Callback):
    "Turns `HostReads` on for the training part of every epoch: batches, augmentation and callbacks."
    order = -100
    def __init__(self, mode): self.mode = mode
    def before_train(self): self.mode.__enter__()
    def after_train(self): self.mode.__exit__(None, None, None)


def host_reads(learn, cbs=()):
    reads = HostReads()
    fit_assignment(learn, 2, 0.01, 0.1, cbs=[WatchTraining(reads), *cbs])
    return sum(reads.sites.values()), reads.sites


def test_fastais_own_progress_bar_reads_the_loss_at_every_batch(folder):
    "The instrument works: fastai's bar formats the smoothed loss, a host read, at each of the 16 batches."
    learn = learner(folder)
    learn.remove_cb(LeanProgress).add_cb(ProgressCallback())
    n, _ = host_reads(learn)
    assert n >= 16


def test_training_reads_the_device_a_few_times_an_epoch_not_every_batch(folder, tmp_path):
    learn = learner(folder)
    n, sites = host_reads(learn, [StopOnDivergence(every=8), RunLog(tmp_path)])
    # per epoch: the loader's start, the bar's one comment, the divergence flag once; 16 batches in all
    assert n <= 3 * 2, sites


def test_the_lean_callbacks_give_fastais_numbers(folder, tmp_path):
    "Reading less often changes nothing that is computed: the same losses and accuracies, to the bit."
    stock = learner(folder)
    stock.remove_cb(LeanProgress).add_cb(ProgressCallback())
    with stock.no_logging(): fit_assignment(stock, 2, 0.01, 0.1)
    lean = learner(folder)
    with lean.no_logging(): fit_assignment(lean, 2, 0.01, 0.1, cbs=[StopOnDivergence(every=8), RunLog(tmp_path)])
    lean_values = [row[1:] for row in lean.recorder.values]  # RunLog adds the epoch's LR as a first column
    assert lean_values == stock.recorder.values and len(stock.recorder.values) == 2


class NaNFrom:
    "A loss that is NaN from training step `n` (counted from 0) on."
    def __init__(self, learn, n): self.learn, self.loss, self.n, self.step = learn, learn.loss_func, n, 0
    def __getattr__(self, k): return getattr(self.loss, k)
    def __call__(self, *a, **k):
        out = self.loss(*a, **k)
        if self.learn.training: self.step += 1
        return out * float('nan') if self.learn.training and self.step > self.n else out


def test_a_divergence_read_late_is_named_exactly(folder):
    learn = learner(folder)
    learn.loss_func = NaNFrom(learn, 10)  # step 11 overall: epoch 2, step 3
    seen = []
    class Steps(Callback):
        def after_batch(self): seen.append((self.epoch, self.iter)) if self.training else None
    with pytest.raises(Diverged) as e, learn.no_logging():
        fit_assignment(learn, 2, 0.01, 0.1, cbs=[StopOnDivergence(every=8), Steps()])
    assert e.value.msg.startswith('training diverged: the loss became nan at epoch 2, step 3 (LR ')
    assert seen[-1] == (1, 6)  # found at the 8th batch's read, the one read of the window


def test_bf16_autocast_on_the_learners_own_device(folder):
    "fastai's to_bf16 autocasts on CUDA only; on a CPU it warns and trains in fp32. BF16 autocasts where the model is."
    learn = learner(folder, precision='bf16')
    dtypes = []
    learn.model.layer3.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with learn.no_logging(): fit_assignment(learn, 1, 0.01, 0.1)
    assert set(dtypes) == {torch.bfloat16} and isinstance(learn.cbs[-1], BF16)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())  # the weights stay fp32
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values)


def test_channels_last_with_bf16_and_no_fp16(folder):
    learn = learner(folder, precision='bf16', channels_last=True)
    with learn.no_logging(): fit_assignment(learn, 1, 0.01, 0.1)
    assert learn.model.layer1.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    amps = [type(c).__name__ for c in learn.cbs if 'Precision' in type(c).__name__ or type(c).__name__ == 'BF16']
    assert amps == ['BF16']  # one mixed-precision callback, not fastai's fp16 one beside it


def test_run_records_the_speed_flags(folder, tmp_path):
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', folder, '--epochs', 1, '--bs', 10, '--lr-min', 0.01, '--lr-max', 0.1,
                   '--precision', 'bf16', '--channels-last', '--deterministic', '--device', 'cpu', '--out', out)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / 'config.json').read_text())
    assert (config['precision'], config['channels_last'], config['deterministic']) == ('bf16', True, True)


def test_an_unknown_precision_is_one_line(folder, tmp_path, capsys):
    code, err = run_here(capsys, 'experiments/run.py', '--data', folder, '--precision', 'fp16', '--out', tmp_path / 'run')
    assert code == 2 and "--precision must be one of fp32, bf16, got 'fp16'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'run').exists()
