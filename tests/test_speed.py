"""The GPU path's speed settings, checked on a CPU: no host read per batch, bf16 autocast, channels-last, the flags."""
import collections, json, traceback

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import AvgLoss, AvgSmoothLoss
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import train
from conftest import make_folder, run_here, run_script
from data import cifar_dls
from callbacks import Diverged, RunLog, StopOnDivergence
from precision import BF16, ChannelsLastBatches, auto_precision
from train import HostLosses, LeanProgress, cifar_learner, fit_assignment


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "4 training images a class: 8 batches of 5 an epoch."
    return make_folder(tmp_path_factory.mktemp('speed') / 'data', n_train=4, n_test=1)


def learner(folder, **kwargs):
    set_seed(0)
    return cifar_learner(cifar_dls(folder, bs=5, device='cpu', seed=0, verbose=False), **kwargs)


def stock(learn):
    "`learn` with fastai's own Recorder sums, metric and progress bar, as fastai builds them."
    learn.recorder.loss, learn.recorder.smooth_loss, learn.metrics = AvgLoss(), AvgSmoothLoss(), accuracy
    return learn.remove_cbs([LeanProgress, HostLosses]).add_cb(ProgressCallback())


class DeviceReads(TorchFunctionMode):
    "Follows every tensor on the training device (data, model, all computed from them) and counts the host's reads."
    # On a CPU `.cpu()` of such a tensor dispatches nothing, so counting aten calls misses it; following the
    # tensors themselves sees every read that on a GPU would make the host wait.
    READS = {'item', 'cpu', 'tolist', 'numpy', '__bool__', '__float__', '__int__', '__index__', '__format__',
             '__array__'}

    def __init__(self, learn):
        super().__init__()
        # Followed by their memory, not their Python objects: fastai rewraps tensors (TensorBase(x), as_subclass),
        # which makes new objects over the same memory without a call this mode sees. The tensors are held, so
        # their memory is not reused while the count runs.
        self.held, self.sites, self.on = {}, collections.Counter(), None  # `on`: the phase counted, or None
        dl = learn.dls.train
        for t in [*learn.model.parameters(), *learn.model.buffers(), dl.images, dl.labels, dl.rows]: self._mark(t)

    @staticmethod
    def _key(t): return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and t.numel() else None

    def _mark(self, t):
        if (k := self._key(t)) is not None: self.held[k] = t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = any(self._key(t) in self.held for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        if device and self.on and getattr(func, '__name__', '') in self.READS:
            frames = [f for f in traceback.extract_stack()[:-1] if '/torch/' not in f.filename]
            self.sites[f'{self.on} {frames[-1].filename}:{frames[-1].lineno}'] += 1
        out = func(*args, **kwargs)
        if device:
            for t in tree_leaves(out): self._mark(t)
        return out


class InBatches(Callback):
    "Switches `DeviceReads` on for each epoch's batches, training and validation: loading, augmentation, all callbacks."
    order = -1000  # first at after_train and after_validate, where the once-an-epoch reads begin
    def __init__(self, reads): self.reads = reads
    def before_train(self): self.reads.on = 'train'
    def before_validate(self): self.reads.on = 'valid'
    def after_train(self): self.reads.on = None
    def after_validate(self): self.reads.on = None


def device_reads(learn, cbs=()):
    "Reads of device tensors inside training and validation batches over a 2-epoch fit: (training, validation, sites)."
    reads = DeviceReads(learn)
    with reads: fit_assignment(learn, 2, 0.01, 0.1, cbs=[InBatches(reads), *cbs])
    count = lambda phase: sum(n for site, n in reads.sites.items() if site.startswith(phase))
    return count('train'), count('valid'), reads.sites


def test_the_instrument_sees_fastais_own_reads(folder):
    "With fastai's own sums and bar: a .cpu() for the smoothed loss and the train metric at each of 16 batches, etc."
    train, valid, sites = device_reads(stock(learner(folder)))
    assert train >= 2 * 16 and valid >= 2 * 4, sites  # validation: the loss and the metric at each of 4 batches


def test_no_host_read_in_a_batch_but_the_divergence_checks(folder, tmp_path):
    learn = learner(folder)
    train, valid, sites = device_reads(learn, [StopOnDivergence(every=4), RunLog(tmp_path)])
    # 8 batches an epoch, 2 epochs, a check every 4 batches: 4 reads, all of them the divergence check's
    assert train == 4 and all('callbacks.py' in site for site in sites), sites
    assert valid == 0, sites  # validation's sums are read once, after its last batch


def test_the_lean_callbacks_give_fastais_numbers(folder, tmp_path):
    "Reading less often changes nothing that is computed: the same losses and accuracies, to the bit."
    fastai = stock(learner(folder))
    with fastai.no_logging(): fit_assignment(fastai, 2, 0.01, 0.1)
    lean = learner(folder)
    losses = []  # each training batch's loss and size, for the epoch mean RunLog adds
    class Losses(Callback):
        def after_batch(self): losses.append((float(self.loss), len(self.yb[0]))) if self.training else None
    with lean.no_logging():
        fit_assignment(lean, 2, 0.01, 0.1, cbs=[StopOnDivergence(every=8), RunLog(tmp_path), Losses()])
    # RunLog adds two columns to fastai's: the epoch's starting LR, and its mean training loss after the smoothed one
    lean_values = [[v for i, v in enumerate(row) if i not in (0, 2)] for row in lean.recorder.values]
    assert lean_values == fastai.recorder.values and len(fastai.recorder.values) == 2
    for epoch, row in enumerate(lean.recorder.values):
        batch = losses[8 * epoch:8 * epoch + 8]
        assert row[2] == pytest.approx(sum(l * n for l, n in batch) / sum(n for _, n in batch), rel=1e-6)
    assert [float(v) for v in lean.recorder.losses] == [float(v) for v in fastai.recorder.losses]


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
    layouts = []  # of every batch as the model receives it, training and validation
    learn.model.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with learn.no_logging(): fit_assignment(learn, 1, 0.01, 0.1)
    assert learn.model.layer1.conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert len(layouts) == 8 + 2 and all(layouts)  # converted once, before the model: no NCHW batch reaches a conv
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
    code, err = run_here(capsys, 'experiments/run.py', '--data', folder, '--precision', 'fp16', '--out',
                         tmp_path / 'run')
    assert code == 2 and "--precision must be one of auto, fp32, bf16, got 'fp16'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'run').exists()


# ---- --precision auto: bf16 + channels-last where the device runs bf16 natively, fp32 elsewhere --------------------

def fake_cpu(monkeypatch, amx=False, avx512_bf16=False, onednn=True):
    "This process's CPU as torch sees it: its AMX and AVX-512 BF16 flags, and whether oneDNN is built in."
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.mkldnn, 'is_available', lambda: onednn)


@pytest.mark.parametrize('flags, chosen', [
    (dict(amx=True, avx512_bf16=True), ('bf16', True, 'this CPU has AMX')),
    (dict(amx=False, avx512_bf16=True), ('bf16', True, 'this CPU has AVX-512 BF16')),
    (dict(amx=False, avx512_bf16=False), ('fp32', False, 'this CPU has neither AMX nor AVX-512 BF16')),
    # oneDNN runs PyTorch's bf16 convolutions on a CPU: without it the units sit idle.
    (dict(amx=True, avx512_bf16=True, onednn=False), ('fp32', False, 'this CPU has neither AMX nor AVX-512 BF16'))])
def test_auto_precision_on_a_cpu(monkeypatch, flags, chosen):
    fake_cpu(monkeypatch, **flags)
    assert auto_precision('cpu') == chosen


@pytest.mark.parametrize('native, chosen', [(True, ('bf16', True, 'GPU X runs bf16 natively')),
                                            (False, ('fp32', False, 'GPU X has no native bf16'))])
def test_auto_precision_on_a_gpu(monkeypatch, native, chosen):
    asked = []
    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a pre-Ampere GPU: bf16 only emulated
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', is_bf16_supported)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'GPU X')
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)  # the host CPU's units don't count for a GPU
    assert auto_precision('cuda') == chosen and asked == [False]


def test_auto_precision_elsewhere_is_fp32(monkeypatch):
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert auto_precision('mps') == ('fp32', False, 'bf16 on mps is not known to be native')


@pytest.mark.parametrize('native', [True, False])
def test_a_learner_on_auto(folder, monkeypatch, native):
    fake_cpu(monkeypatch, avx512_bf16=native)
    cbs = {type(cb) for cb in learner(folder, precision='auto').cbs}
    assert (BF16 in cbs, ChannelsLastBatches in cbs) == (native, native)


@pytest.mark.parametrize('native', [True, False])
def test_run_defaults_to_auto_and_records_its_choice(folder, tmp_path, capsys, monkeypatch, native):
    fake_cpu(monkeypatch, avx512_bf16=native)
    out = tmp_path / 'run'
    code, _ = run_here(capsys, 'experiments/run.py', '--data', folder, '--epochs', 1, '--bs', 10, '--lr-min', 0.01,
                       '--lr-max', 0.1, '--device', 'cpu', '--out', out, '--seed', 0)
    assert code == 0
    config = json.loads((out / 'config.json').read_text())
    said = ('bf16 autocast + channels-last (auto: this CPU has AVX-512 BF16)' if native else
            'fp32 (auto: this CPU has neither AMX nor AVX-512 BF16)')
    assert (config['precision'], config['channels_last'], config['precision_choice']) == (
        ('bf16', True, said) if native else ('fp32', False, said))


def test_auto_on_this_machine(folder, tmp_path):
    "Unfaked, in a fresh process: the run trains with what auto_precision says of this machine's CPU."
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', folder, '--epochs', 1, '--bs', 10, '--lr-min', 0.01, '--lr-max', 0.1,
                   '--device', 'cpu', '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'UserWarning' not in r.stderr  # fastai's "CUDA is not available" warning of its own autocast is not shown
    config = json.loads((out / 'config.json').read_text())
    precision, channels_last, why = auto_precision('cpu')
    assert (config['precision'], config['channels_last']) == (precision, channels_last) \
        and why in config['precision_choice']
    assert f"precision: {config['precision_choice']}\n" in r.stdout  # said at the start


def test_resume_keeps_the_precision_auto_chose(folder, tmp_path, capsys, monkeypatch):
    "A run auto made bf16 resumes in bf16 on a machine where auto would say fp32: the run's numbers stay one kind."
    fake_cpu(monkeypatch, avx512_bf16=True)
    out = tmp_path / 'run'
    code, _ = run_here(capsys, 'experiments/run.py', '--data', folder, '--epochs', 2, '--bs', 10, '--lr-min', 0.01,
                       '--lr-max', 0.1, '--device', 'cpu', '--out', out, '--seed', 0)
    assert code == 0
    # as if stopped before its first checkpoint: --resume trains it again from lr_find.json
    (out / 'model.pth').unlink()
    fake_cpu(monkeypatch)  # resumed on a CPU without bf16
    built = []
    def spy(*args, **kwargs):
        built.append((kwargs['precision'], kwargs['channels_last']))
        return cifar_learner(*args, **kwargs)
    monkeypatch.setattr(train, 'cifar_learner', spy)
    code, _ = run_here(capsys, 'experiments/run.py', '--resume', out)
    assert code == 0 and built == [('bf16', True)] and (out / 'model.pth').exists()
