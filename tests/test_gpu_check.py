"""The GPU check's script parses and refuses a bad data folder, and its profiler runs on a CPU, in seconds."""
import json, subprocess, sys, tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from conftest import ROOT, make_folder, run_here

sys.path.insert(0, str(ROOT / 'experiments'))
from profile_epoch import busy_us, device_busy, report  # noqa: E402

SCRIPT = ROOT / 'tools' / 'gpu_check.sh'


def test_the_script_parses():
    r = subprocess.run(['bash', '-n', str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_script_refuses_a_folder_without_the_data(tmp_path):
    r = subprocess.run(['bash', str(SCRIPT), str(tmp_path / 'nope')], capture_output=True, text=True,
                       env={'PATH': '/usr/bin:/bin', 'RESULTS': str(tmp_path / 'results')})
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'has no train/ and test/' in r.stderr
    assert not (tmp_path / 'results').exists()  # nothing created before the check


def gpu_check(tmp_path, *steps, **env):
    "The script over a data folder with `true` for Python: its bookkeeping alone, in a second."
    env = {'PATH': '/usr/bin:/bin', 'PYTHON': 'true', 'RESULTS': str(tmp_path / 'r'), 'OUT': str(tmp_path / 'out'),
           'STEPS': ' '.join(steps), **env}
    return subprocess.run(['bash', str(SCRIPT), str(tmp_path / 'data')], capture_output=True, text=True, env=env)


def packed(tmp_path):
    with tarfile.open(tmp_path / 'out' / 'gpu-results.tgz') as tf: return {Path(n).as_posix() for n in tf.getnames()}


def test_the_script_records_packs_and_resumes(tmp_path):
    make_folder(tmp_path / 'data', 1, 1)
    r = gpu_check(tmp_path, 'decode')
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / 'r' / 'steps.tsv').read_text().split('\t')[:2] == ['decode', '0']
    assert {'steps.tsv', 'decode.log', 'gpu_check.log', 'env.txt'} <= packed(tmp_path)
    assert (tmp_path / 'out' / 'gpu_check.log').exists()
    weights = tmp_path / 'r' / 'fp32' / 'runs' / 'seed0' / 'model.pth'
    weights.parent.mkdir(parents=True); weights.write_bytes(b'w')
    # A second call: the finished step is not redone, a step without the time it needs is left for the next one.
    r = gpu_check(tmp_path, 'decode', 'profile', BUDGET='5')
    assert r.returncode == 1
    assert 'decode: done in an earlier call' in r.stdout and 'profile: NOT RUN' in r.stdout
    assert 'end: decode=0 profile=skipped' in r.stdout
    files = packed(tmp_path)
    assert 'fp32/runs/seed0' in files and not any(f.endswith('.pth') for f in files)  # no weights come back


def test_busy_time_counts_overlaps_once():
    assert busy_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert busy_us([]) == 0


def event(name, start, end, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                           is_user_annotation=annotation)


def test_device_time_is_split_by_phase_without_the_markers():
    # Two phase markers on the host, kernels on the device, and the device-side copy of a marker (a GPU
    # "user annotation" spanning the whole phase), which must not count as busy time.
    events = [event('phase:train', 0, 100, DeviceType.CPU), event('phase:valid', 100, 150, DeviceType.CPU),
              event('phase:train', 0, 100, annotation=True), event('conv', 10, 30), event('bn', 25, 40),
              event('conv', 110, 120), event('aten::add', 0, 150, DeviceType.CPU)]
    assert device_busy(events) == dict(all=40, train=30, valid=10)
    assert device_busy([e for e in events if e.device_type == DeviceType.CPU]) is None  # a CPU profile


def test_profile_epoch_on_the_cpu(tiny, tmp_path, capsys):
    out = tmp_path / 'profile'
    code, err = run_here(capsys, 'experiments/profile_epoch.py', '--data', tiny, '--subset', 10, '--bs', 5,
                         '--device', 'cpu', '--top', 5, '--out', out)
    assert code == 0, err
    s = json.loads((out / 'profile.json').read_text())
    for run in ('unprofiled', 'profiled'):
        train, valid = s[run]['phases']['train'], s[run]['phases']['valid']
        assert train['batches'] == 2 and valid['batches'] == 1  # 10 images in batches of 5; 2 test images
        assert 0 < train['host_ms'] <= train['wall_ms'] and train['device_ms'] is None  # no device timeline
    ops = s['top_ops']
    assert len(ops) == 5 and ops == sorted(ops, key=lambda o: o['self_cpu_ms'], reverse=True)
    assert not any(o['name'].startswith('phase:') for o in ops)
    text = (out / 'profile.txt').read_text()
    assert 'Top 5 operations by self CPU time' in text and 'aten::' in text


def test_the_report_of_a_gpu_profile():
    # The device columns appear only on a GPU: formatted here, so that a typo cannot cost a GPU run its profile.
    phases = dict(train=dict(batches=97, host_ms=9.5, wall_ms=10., device_ms=8.), valid=dict(
        batches=20, host_ms=2., wall_ms=3., device_ms=2.5))
    s = dict(device_name='NVIDIA H200', precision='bf16', channels_last=True, bs=512, n_train=50000,
             unprofiled=dict(phases={k: {**v, 'device_ms': None} for k, v in phases.items()}, epoch_wall_s=1.1),
             profiled=dict(phases=phases, epoch_wall_s=1.2))
    text = report(s)
    assert 'profiled epoch   train   97 batches  host    9.50  wall   10.00  device    8.00' in text
    assert 'unprofiled epoch train   97 batches  host    9.50  wall   10.00  device     n/a' in text
    assert 'the device was busy 80% of the wall time' in text


@pytest.mark.parametrize('flags, says', [(['--data', 'nope'], 'does not exist'),
                                         (['--precision', 'fp16'], '--precision must be one of'),
                                         (['--warmup', '0'], '--warmup is a fraction')])
def test_profile_epoch_one_line_errors(tiny, tmp_path, capsys, flags, says):
    args = ['--data', tiny, '--device', 'cpu', '--out', tmp_path / 'p', *flags]
    code, err = run_here(capsys, 'experiments/profile_epoch.py', *args)
    assert code == 2 and err.count('\n') == 1 and err.startswith('profile_epoch.py: error:') and says in err, err
    assert not (tmp_path / 'p').exists()
