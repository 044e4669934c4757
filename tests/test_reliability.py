"""A killed run resumes exactly, one seed gives one run, a diverging run stops with a message, bad input is named."""
import csv, json, os, signal, subprocess, sys, threading, time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fastai.torch_core import set_seed

from conftest import ROOT, make_folder, run_here, run_script
from data import cifar_dls
from callbacks import Checkpoint, Diverged, RunLog, StopOnDivergence, load_checkpoint
from train import cifar_learner, fit_assignment

# On the CPU: bit-for-bit equality is a CPU promise (CUDA's max-pool backward adds atomically, in any order).
FLAGS = ['--epochs', '4', '--bs', '20', '--lr-min', '0.01', '--lr-max', '0.1', '--seed', '3', '--device', 'cpu']


def rows(path, drop=('seconds',)):
    with open(path) as fh: return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('rel') / 'data')


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('rel') / 'run'
    r = run_script('experiments/run.py', '--data', data, *FLAGS, '--out', out)
    assert r.returncode == 0, r.stderr
    return out


def test_same_seed_same_metrics(data, uninterrupted, tmp_path):
    r = run_script('experiments/run.py', '--data', data, *FLAGS, '--out', tmp_path / 'again')
    assert r.returncode == 0, r.stderr
    assert rows(tmp_path / 'again' / 'metrics.csv') == rows(uninterrupted / 'metrics.csv')


def killed_run(data, out):
    "A run of FLAGS killed with SIGKILL as soon as its first checkpoint is written."
    cmd = [sys.executable, 'experiments/run.py', '--data', str(data), *FLAGS, '--out', str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / 'checkpoint.pth').exists() and time.time() < deadline and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(rows(out / 'metrics.csv'))
    assert 1 <= done < 4 and not (out / 'model.pth').exists()  # killed mid-run, after its first epoch
    return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(data, uninterrupted, tmp_path):
    out = killed_run(data, tmp_path / 'killed')
    r = run_script('experiments/run.py', '--resume', out)
    assert r.returncode == 0, r.stderr
    assert f'resuming {out} after epoch' in r.stdout
    got, want = rows(out / 'metrics.csv'), rows(uninterrupted / 'metrics.csv')
    assert [g['epoch'] for g in got] == ['1', '2', '3', '4']  # each epoch once
    assert got == want  # the same LRs, losses and accuracies as a run that was never killed
    assert rows(out / 'schedule.csv') == rows(uninterrupted / 'schedule.csv')
    assert (out / 'model.pth').exists() and not (out / 'checkpoint.pth').exists()


def interrupted(cmd, ready, timeout=300):
    "Run `cmd` (run.py's flags), send it a real SIGINT once `ready(stdout lines so far)` holds; (exit status, stderr)."
    p = subprocess.Popen([sys.executable, 'experiments/run.py', *map(str, cmd)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + timeout
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, '')), daemon=True)
    reader.start()
    while not ready(lines) and time.time() < deadline and p.poll() is None: time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    err = p.stderr.read()
    p.wait(timeout=120)
    return p.returncode, err


def test_ctrl_c_in_training_says_how_to_continue_and_resume_finishes(data, uninterrupted, tmp_path):
    out = tmp_path / 'run'
    code, err = interrupted(['--data', data, *FLAGS, '--out', out], lambda _: (out / 'checkpoint.pth').exists())
    assert code == 130 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    done = torch.load(out / 'checkpoint.pth', weights_only=False)['epoch']
    assert 1 <= done < 4 and f'interrupted during epoch {done + 1} of 4; epochs 1-{done} are saved in' in err
    assert err.strip().endswith(f'continue with: python experiments/run.py --resume {out}')
    r = run_script('experiments/run.py', '--resume', out)
    assert r.returncode == 0, r.stderr
    assert rows(out / 'metrics.csv') == rows(uninterrupted / 'metrics.csv')  # every epoch once, as if never stopped


def test_ctrl_c_in_the_first_epoch_resumes_from_the_start(data, tmp_path):
    "Stopped before any checkpoint: the finder's LRs are kept, and --resume trains all epochs, each logged once."
    out = tmp_path / 'run'
    flags = ['--data', data, '--epochs', 2, '--bs', 5, '--lr-min', 0.01, '--lr-max', 0.1, '--device', 'cpu',
             '--out', out]
    code, err = interrupted(flags, lambda lines: any(l.startswith('ETA:') for l in lines))  # after 5 of 12 batches
    assert code == 130 and 'interrupted during epoch 1 of 2, before any epoch was saved' in err, err
    assert not (out / 'checkpoint.pth').exists() and (out / 'lr_find.json').exists()
    r = run_script('experiments/run.py', '--resume', out)
    assert r.returncode == 0, r.stderr
    assert [g['epoch'] for g in rows(out / 'metrics.csv')] == ['1', '2'] and (out / 'model.pth').exists()


def test_ctrl_c_in_lr_find_leaves_no_run_folder(data, tmp_path):
    out = tmp_path / 'run'
    flags = ['--data', data, '--epochs', 2, '--bs', 5, '--find-iters', 400, '--device', 'cpu', '--out', out]
    code, err = interrupted(flags, lambda lines: any(l.startswith('lr_find:') for l in lines))
    assert code == 130 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    assert f'interrupted during lr_find; there is nothing to resume, so {out} was removed' in err
    assert not out.exists()


def test_a_gpu_run_resumes_on_another_device(data, tmp_path, capsys):
    "A checkpoint written on a GPU (a CUDA random stream, device cuda:0) continues with --device cpu."
    out = killed_run(data, tmp_path / 'gpu-run')
    state = torch.load(out / 'checkpoint.pth', weights_only=False)
    py, npy, cpu, _, dls = state['rng']
    state['rng'] = (py, npy, cpu, [torch.zeros(16, dtype=torch.uint8)], dls)  # a CUDA generator's state: 16 bytes
    torch.save(state, out / 'checkpoint.pth')
    config = json.loads((out / 'config.json').read_text())
    (out / 'config.json').write_text(json.dumps({**config, 'device': 'cuda:0'}))
    if not torch.cuda.is_available():
        code, err = run_here(capsys, 'experiments/run.py', '--resume', out)
        assert code == 2 and 'add --device cpu' in err and len(err.splitlines()) == 1
    r = run_script('experiments/run.py', '--resume', out, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    assert [g['epoch'] for g in rows(out / 'metrics.csv')] == ['1', '2', '3', '4'] and (out / 'model.pth').exists()


def test_resumed_optimizer_state_lives_on_the_parameters_device(tmp_path):
    "A checkpoint loaded for another device: momentum buffers follow the weights there, not left on the CPU."
    folder = make_folder(tmp_path / 'd', n_train=1, n_test=1)
    set_seed(0)
    learn = cifar_learner(cifar_dls(folder, bs=5, device='cpu', verbose=False))
    with learn.no_logging(): fit_assignment(learn, 1, 0.01, 0.1, cbs=[Checkpoint(tmp_path / 'ck.pth')])
    resumed = cifar_learner(cifar_dls(folder, bs=5, device='cpu', verbose=False))
    resumed.dls.device = torch.device('meta')  # a device other than the CPU the checkpoint is read onto
    load_checkpoint(resumed, tmp_path / 'ck.pth')
    resumed.model.to(resumed.dls.device)  # what fastai's TrainEvalCallback.before_fit does, and no more
    state = resumed.opt.opt.state
    assert len(state) == len(list(resumed.model.parameters()))  # every parameter has its momentum buffer
    assert all(buf.device == p.device == torch.device('meta') for p, s in state.items() for buf in s.values())


@pytest.mark.parametrize('setup,message', [
    (lambda d: None, 'no such run folder'),
    (lambda d: d.mkdir(), 'not a run folder'),
])
def test_resume_needs_a_run_folder(tmp_path, capsys, setup, message):
    setup(tmp_path / 'r')
    code, err = run_here(capsys, 'experiments/run.py', '--resume', tmp_path / 'r')
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_resume_of_a_finished_run_says_so(uninterrupted, capsys):
    code, err = run_here(capsys, 'experiments/run.py', '--resume', uninterrupted)
    assert code == 2 and 'already finished' in err


class NaNAfter:
    "A loss that turns NaN after `n` training steps: a divergence on cue."
    def __init__(self, learn, n): self.learn, self.loss, self.n, self.calls = learn, learn.loss_func, n, 0
    def __getattr__(self, k): return getattr(self.loss, k)
    def __call__(self, *a, **k):
        self.calls += self.learn.training
        out = self.loss(*a, **k)
        return out * float('nan') if self.calls > self.n else out


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    set_seed(0)
    learn = cifar_learner(cifar_dls(make_folder(tmp_path / 'd', n_train=1, n_test=1), bs=5, device='cpu',
                                    verbose=False))
    learn.remove_cb(learn.progress)
    learn.loss_func = NaNAfter(learn, n=3)  # 2 steps an epoch: NaN in the 2nd step of epoch 2
    with pytest.raises(Diverged) as e, learn.no_logging():
        fit_assignment(learn, 4, 0.01, 0.1, cbs=[RunLog(tmp_path), StopOnDivergence(), Checkpoint(tmp_path / 'ck.pth')])
    assert e.value.msg.startswith('training diverged: the loss became nan at epoch 2, step 2 (LR ')
    assert e.value.msg.endswith('try a lower --lr-max')
    state = torch.load(tmp_path / 'ck.pth', weights_only=False)
    assert state['epoch'] == 1 and all(torch.isfinite(v).all()
                                       for v in state['model'].values() if v.is_floating_point())
    assert len(rows(tmp_path / 'metrics.csv')) == 1


def test_a_diverging_run_exits_1_with_one_line(data, tmp_path):
    r = run_script('experiments/run.py', '--data', data, '--epochs', 2, '--bs', 20, '--lr-min', 1e3, '--lr-max', 1e7,
                   '--out', tmp_path / 'run')
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert 'training diverged' in r.stderr and 'try a lower --lr-max (it was 1e+07)' in r.stderr


def test_corrupt_images_are_named_before_anything_is_made(tmp_path):
    data = make_folder(tmp_path / 'd')
    (data / 'train' / 'c2' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    (data / 'test' / 'c5' / 'text.png').write_text('not an image')
    r = run_script('experiments/run.py', '--data', data, '--out', tmp_path / 'run')
    assert r.returncode == 2 and '2 unreadable image(s)' in r.stderr
    assert 'broken.jpg' in r.stderr and 'text.png' in r.stderr and not (tmp_path / 'run').exists()


@pytest.mark.parametrize('make,message', [
    (lambda p: p.mkdir(), 'has no train/ or test/ folder'),
    (lambda p: (p / 'train').mkdir(parents=True), 'has no test/ folder'),
])
def test_incomplete_data_folders_name_what_is_missing(tmp_path, capsys, make, message):
    make(tmp_path / 'd')
    code, err = run_here(capsys, 'experiments/run.py', '--data', tmp_path / 'd', '--out', tmp_path / 'run')
    assert code == 2 and message in err


def test_out_that_is_a_file(tmp_path, capsys, data):
    (tmp_path / 'f').write_text('x')
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--out', tmp_path / 'f')
    assert code == 2 and 'is a file, not a folder' in err


def test_out_that_is_not_empty(tmp_path, capsys, data):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'keep.txt').write_text('an earlier run')
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--out', tmp_path / 'run')
    assert code == 2 and 'is not empty; choose a new folder' in err and len(err.splitlines()) == 1
    assert [p.name for p in (tmp_path / 'run').iterdir()] == ['keep.txt']


def test_out_that_is_not_writable(tmp_path, capsys, data, monkeypatch):
    # Simulated: the tests run as root in CI, where every folder is writable.
    access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: Path(p) != tmp_path and access(p, mode, **kw))
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--out', tmp_path / 'new' / 'run')
    assert code == 2 and f'{tmp_path} is not writable' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'new').exists()


def test_more_processes_than_gpus(tmp_path, capsys, data, monkeypatch):
    # Simulated: process 1 of 2 under torchrun on a machine with one GPU.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--out', tmp_path / 'run')
    assert code == 2 and 'process 1 has no GPU of its own (1 GPU(s) here)' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'run').exists()


def test_a_batch_that_does_not_split_over_the_processes(tmp_path, capsys, data, monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '3')
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--bs', 512, '--out', tmp_path / 'run')
    assert code == 2 and '--bs 512 does not split evenly over 3 processes' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'run').exists()


def test_a_finder_curve_too_short_is_a_run_failure_not_a_usage_error(tmp_path, capsys, data):
    # 6 finder steps leave 1 point once fastai's trimming is done: no LRs can be read off it.
    code, err = run_here(capsys, 'experiments/run.py', '--data', data, '--bs', 20, '--epochs', 1, '--find-iters', 6,
                         '--device', 'cpu', '--out', tmp_path / 'run')
    assert code == 1 and 'lr_find could not choose LRs' in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize('before', [None, '0'])
def test_distributed_restores_the_environment(tmp_path, monkeypatch, before):
    import processes
    learn = cifar_learner(cifar_dls(make_folder(tmp_path / 'd', n_train=1, n_test=1), bs=5, device='cpu',
                                    verbose=False))
    seen = {}
    @contextmanager
    def distrib_ctx(**kwargs):
        seen.update(kwargs, env=os.environ.get('ACCELERATE_USE_CPU'))
        yield
    learn.distrib_ctx = distrib_ctx  # fastai's would start a process group; what is checked here is ours around it
    monkeypatch.setattr(processes, 'num_distrib', lambda: 2)
    if before is None: monkeypatch.delenv('ACCELERATE_USE_CPU', raising=False)
    else: monkeypatch.setenv('ACCELERATE_USE_CPU', before)
    with processes.distributed(learn): pass
    assert seen == dict(sync_bn=False, env=before or '1')  # a user's own setting is kept while it runs
    assert os.environ.get('ACCELERATE_USE_CPU') == before
