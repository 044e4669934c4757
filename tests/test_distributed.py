"""torchrun with 2 CPU processes (gloo): one run folder, written by rank 0, with the single-process LR schedule."""
import json

from conftest import run_script

# gloo on the CPU, also on a GPU machine: two processes need two GPUs for NCCL.
FLAGS = ['--epochs', '1', '--bs', '20', '--lr-min', '0.01', '--lr-max', '0.1', '--seed', '0', '--device', 'cpu']


def test_torchrun_two_processes_on_cpu(cifar10, tmp_path):
    out, single = tmp_path / 'ddp', tmp_path / 'single'
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'experiments/run.py',
                   '--data', cifar10, '--subset', 200, *FLAGS, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('test accuracy') == 1  # rank 0 alone reports and writes
    config = json.loads((out / 'config.json').read_text())
    assert config['processes'] == 2 and config['bs'] == 20  # --bs stays the global batch
    assert (out / 'model.pth').exists() and (out / 'report.md').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ddp']  # one run folder
    r = run_script('experiments/run.py', '--data', cifar10, '--subset', 200, *FLAGS, '--out', single)
    assert r.returncode == 0, r.stderr
    with open(out / 'schedule.csv') as a, open(single / 'schedule.csv') as b: assert list(a) == list(b)
