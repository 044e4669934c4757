"""Under CI a missing shared file fails the run: the real-data tests and the assignment's table cannot skip quietly."""
import os, subprocess, sys

from conftest import ROOT

# A test of each kind: the `cifar10` fixture (real-data runs, notebook, distributed, loader speed) and the assignment.
NEEDS_SHARED = ['tests/test_data.py::test_subset_of_real_cifar',
                'tests/test_arch.py::test_expected_table_is_the_one_in_the_assignment']


def pytest_without_shared(ci, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('CI', 'CIFAR10_DIR')}
    env.update(CIFAR10_TGZ=str(tmp_path / 'missing.tgz'), ASSIGNMENT_MD=str(tmp_path / 'missing.md'),
               PYTHONWARNINGS='ignore::FutureWarning', **({'CI': ci} if ci is not None else {}))
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rfEs', *NEEDS_SHARED],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_shared_files_fail_under_ci_and_skip_elsewhere(tmp_path):
    r = pytest_without_shared('true', tmp_path)
    assert r.returncode != 0 and '1 failed' in r.stdout and '1 error' in r.stdout, r.stdout[-2000:]
    assert 'missing.tgz not found (set CIFAR10_TGZ); CI needs it' in r.stdout and 'missing.md not found' in r.stdout
    r = pytest_without_shared(None, tmp_path)
    assert r.returncode == 0 and '2 skipped' in r.stdout, r.stdout[-2000:]
