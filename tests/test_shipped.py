"""The shipped run: its model.pth, on all 10,000 test images, reaches the accuracy that its metrics.csv and the README state."""
import json, re

import torch

from conftest import ROOT
from predict import evaluate_run
from report import read_csv

SHIPPED = ROOT / 'results' / 'cpu-bf16-seed0'  # the README's first command, run to the end on 2 CPU cores


def stated():
    "The test accuracy (a fraction) of the run's last epoch in metrics.csv, and the README's results table's (in %)."
    last = read_csv(SHIPPED / 'metrics.csv')[-1]
    row = re.search(r'^\| 2 CPU cores.*?\| (\d+\.\d+)% \|', (ROOT / 'README.md').read_text(), re.M)
    return last['test_acc'], float(row.group(1))


def test_the_shipped_model_reaches_the_stated_accuracy(cifar10):
    config = json.loads((SHIPPED / 'config.json').read_text())
    assert config['epochs'] == 24 and config['subset'] is None and config['n_test'] == 10_000  # the whole job, all of it
    in_csv, in_readme = stated()
    _, acc = evaluate_run(SHIPPED, cifar10)
    assert abs(acc - in_csv) <= 0.001 and abs(100 * acc - in_readme) <= 0.1, (acc, in_csv, in_readme)


def test_the_weights_file_is_small_and_half_precision():
    "What the repository keeps: fp16 weights, 13 MB (the cost of fp16 against fp32 is results/cpu-bf16-seed0/half-weights.log)."
    state = torch.load(SHIPPED / 'model.pth', map_location='cpu')
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert (SHIPPED / 'model.pth').stat().st_size <= 30e6
