"""The GPU check's script parses and refuses a bad data folder, and its profiler runs on a CPU, in seconds."""
import json, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from conftest import ROOT, run_here

sys.path.insert(0, str(ROOT / 'experiments'))
from profile_epoch import busy_us, device_busy  # noqa: E402

SCRIPT = ROOT / 'experiments' / 'gpu_check.sh'


def test_the_script_parses():
    r = subprocess.run(['bash', '-n', str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_script_refuses_a_folder_without_the_data(tmp_path):
    r = subprocess.run(['bash', str(SCRIPT), str(tmp_path / 'nope')], capture_output=True, text=True,
                       env={'PATH': '/usr/bin:/bin', 'RESULTS': str(tmp_path / 'results')})
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'has no train/ and test/' in r.stderr
    assert not (tmp_path / 'results').exists()  # nothing created before the check


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


@pytest.mark.parametrize('flags, says', [(['--data', 'nope'], 'does not exist'),
                                         (['--precision', 'fp16'], '--precision must be one of'),
                                         (['--warmup', '0'], '--warmup is a fraction')])
def test_profile_epoch_one_line_errors(tiny, tmp_path, capsys, flags, says):
    args = ['--data', tiny, '--device', 'cpu', '--out', tmp_path / 'p', *flags]
    code, err = run_here(capsys, 'experiments/profile_epoch.py', *args)
    assert code == 2 and err.count('\n') == 1 and err.startswith('profile_epoch.py: error:') and says in err, err
    assert not (tmp_path / 'p').exists()
