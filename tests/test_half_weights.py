"""tools/half_weights.py: what fp16 weights cost, measured with fastai's get_preds; the file written only if allowed."""
import re, shutil

import torch

from conftest import run_script
from run_folder import evaluate_run


def copy_of(tiny_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    return run, tiny_run.parent / 'data'


def test_half_weights_measures_then_writes(tiny_run, tmp_path):
    run, data = copy_of(tiny_run, tmp_path)
    full = torch.load(run / 'model.pth')
    r = run_script('tools/half_weights.py', run, '--data', data, '--write', '--max-drop', 100)
    assert r.returncode == 0, r.stderr
    acc32, acc16 = map(float, re.findall(r'fp(?:32|16) weights: test accuracy ([\d.]+)%', r.stdout))
    # the run's own weights, as the run measured them
    assert abs(100 * evaluate_run(tiny_run, data, tta=False).metrics['test_acc'] - acc32) < 0.006
    half = torch.load(run / 'model.pth')
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], v.half())
               for k, v in full.items() if v.is_floating_point())
    # what the fp16 file gives, loaded as every tool loads it
    assert abs(100 * evaluate_run(run, data, tta=False).metrics['test_acc'] - acc16) < 0.006
    assert (run / 'model.pth').stat().st_size < 0.55 * (tiny_run / 'model.pth').stat().st_size
    r = run_script('tools/half_weights.py', run, '--data', data)
    assert r.returncode == 2 and r.stderr.strip().endswith('is not fp32 (already converted?)'), r.stderr


def test_half_weights_keeps_fp32_when_fp16_costs_too_much(tiny_run, tmp_path):
    run, data = copy_of(tiny_run, tmp_path)
    r = run_script('tools/half_weights.py', run, '--data', data, '--write', '--max-drop', -1)  # any cost is too much
    assert r.returncode == 1 and 'more than --max-drop -1.0; kept fp32' in r.stderr, r.stderr
    assert torch.load(run / 'model.pth')['prep.0.weight'].dtype == torch.float32
