"""On a CUDA GPU, every command as a user runs it: run.py, cams.py, --resume, bench.py --subset, the README snippet.

Skipped without CUDA. On a GPU machine: `CIFAR10_DIR=<cifar10 folder> python -m pytest tests/gpu` (or CIFAR10_TGZ
pointing at the lossless archive). The CPU suite cannot see device mismatches: these tests are where they show.
"""
import json, re, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import ROOT, run_script  # noqa: E402
from test_readme import readme_snippet, run_snippet  # noqa: E402
from test_run import check_run_folder  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

# A quick run: 2,000 images, batches of 256, so an epoch is 7 steps and a 40-step finder spans 6 epochs.
FLAGS = ['--subset', '2000', '--bs', '256', '--device', 'cuda', '--seed', '0']


@pytest.fixture(scope='module')
def gpu_run(cifar10, tmp_path_factory):
    "A finished 3-epoch run on the GPU, with the finder."
    out = tmp_path_factory.mktemp('gpu') / 'run'
    r = run_script('experiments/run.py', '--data', cifar10, *FLAGS, '--epochs', 3, '--find-iters', 40, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_run_on_the_gpu(gpu_run):
    rows, config = check_run_folder(gpu_run, 3)
    assert config['device'].startswith('cuda') and config['device_name'] == torch.cuda.get_device_name()
    assert rows[-1]['test_acc'] and float(rows[-1]['test_acc']) > 0.2  # it learned something in 3 short epochs


def test_cams_on_the_gpu(gpu_run, tmp_path):
    r = run_script('cams.py', '--n', 4, '--run', gpu_run, '--out', tmp_path, '--compare-layers')
    assert r.returncode == 0, r.stderr[-3000:]
    assert {'gradcam.png', 'gradcam_04.png', 'gradcam_layers.png'} <= {p.name for p in tmp_path.iterdir()}


def test_evaluate_on_the_gpu(gpu_run):
    "experiments/evaluate.py on the GPU (bf16, channels-last, Mirror callback on CUDA batches): the run's own numbers."
    r = run_script('experiments/evaluate.py', '--run', gpu_run, '--device', 'cuda', '--dry-run')
    assert r.returncode == 0, r.stderr[-3000:]
    recorded = json.loads((gpu_run / 'config.json').read_text())['test_metrics']
    shown = re.search(r'test accuracy ([\d.]+)%, ([\d.]+)% with mirror TTA', r.stdout)
    assert shown and recorded['precision'] == 'bf16', r.stdout
    # 400 test images: one image is 0.25 points, and cuDNN may pick other kernels than in the run.
    assert abs(float(shown[1]) - 100 * recorded['test_acc']) <= 0.26, (r.stdout, recorded)
    assert abs(float(shown[2]) - 100 * recorded['test_acc_tta']) <= 0.26, (r.stdout, recorded)


def killed(cifar10, out, epochs=4):
    "A GPU run killed with SIGKILL once its first checkpoint is written."
    cmd = [sys.executable, 'experiments/run.py', '--data', str(cifar10), *FLAGS, '--epochs', str(epochs),
           '--lr-min', '0.004', '--lr-max', '0.4', '--out', str(out)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / 'checkpoint.pth').exists() and time.time() < deadline and p.poll() is None: time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / 'checkpoint.pth').exists() and not (out / 'model.pth').exists()
    return out


@pytest.mark.parametrize('device', ['cuda', 'cpu'])
def test_resume_on_the_gpu_and_from_the_gpu_to_the_cpu(cifar10, tmp_path, device):
    out = killed(cifar10, tmp_path / 'run')
    r = run_script('experiments/run.py', '--resume', out, '--device', device)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [line.split(',')[0] for line in (out / 'metrics.csv').read_text().splitlines()[1:]]
    assert epochs == ['1', '2', '3', '4'] and (out / 'model.pth').exists()


def test_bench_subset_on_the_gpu(cifar10, tmp_path):
    r = run_script('experiments/bench.py', '--data', cifar10, '--seeds', 2, '--epochs', 2, '--baseline-epochs', 1,
                   '--subset', 2000, '--bs', 256, '--find-iters', 40, '--device', 'cuda', '--out', tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / 'summary.json').read_text())
    assert s['device'] == torch.cuda.get_device_name() and len(s['test_acc']) == 2


def test_the_readme_snippet_on_the_gpu(cifar10):
    out = run_snippet(readme_snippet(cifar10, bs=256, epochs=2, subset=2000, find_iters=40))
    assert out['device'].startswith('cuda') and 0 < float(out['lrmin']) < float(out['lrmax'])
