"""torchrun with 2 CPU processes (gloo): one run folder, written by rank 0, with the single-process LR schedule."""
import json

from conftest import run_script

# gloo on the CPU, also on a GPU machine: two processes need two GPUs for NCCL.
FLAGS = ['--epochs', '1', '--bs', '20', '--seed', '0', '--device', 'cpu', '--subset', '200']


def test_torchrun_two_processes_on_cpu(cifar10, tmp_path, monkeypatch):
    out, single, log = tmp_path / 'ddp', tmp_path / 'single', tmp_path / 'log'
    log.mkdir()
    monkeypatch.setenv('LR_LOG', str(log))
    # No --lr-min/--lr-max: every process runs the finder, and rank 1's answers twice as high as rank 0's.
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'tests/ddp_skewed_finder.py',
                   '--data', cifar10, *FLAGS, '--find-iters', 20, '--out', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('test accuracy') == 1  # rank 0 alone reports and writes
    config = json.loads((out / 'config.json').read_text())
    assert config['processes'] == 2 and config['bs'] == 20  # --bs stays the global batch
    assert (out / 'model.pth').exists() and (out / 'report.md').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ddp', 'log']  # one run folder
    found = json.loads((out / 'lr_find.json').read_text())
    ranks = [json.loads((log / f'rank{i}.json').read_text()) for i in (0, 1)]
    for rank in ranks:
        assert rank['finder_bs'] == 20 and rank['bs'] == 10  # the finder at the global batch; training at each share
        assert (rank['lr_min'], rank['lr_max']) == (found['lr_min'], found['lr_max'])  # rank 0's LRs, broadcast
    r = run_script('experiments/run.py', '--data', cifar10, *FLAGS, '--lr-min', found['lr_min'],
                   '--lr-max', found['lr_max'], '--out', single)
    assert r.returncode == 0, r.stderr
    with open(out / 'schedule.csv') as a, open(single / 'schedule.csv') as b: assert list(a) == list(b)
