"""The checkout is the suite: the install brings no module of ours; every command and import works from any folder."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from conftest import ROOT, skip_or_fail

OURS = sorted(p.stem for p in ROOT.glob('*.py'))  # arch, cams, data, …: the modules every command imports
COMMANDS = ['cams.py', 'app.py', *sorted(f'{p.parent.name}/{p.name}' for d in ('experiments', 'tools')
                                          for p in (ROOT / d).glob('*.py'))]
# Installed by the [test] extra for this file: two packages whose import names are two of our modules' names.
NAMESAKES = {'arch': 'arch', 'interpret': 'interpret-core'}


def env(**extra):
    "The environment of a user's shell: nothing of pytest's, no PYTHONPATH or warning filter unless given."
    return {**{k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONWARNINGS')}, **extra}


def python(code, cwd, **extra):
    r = subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env(**extra), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture
def elsewhere(tmp_path):
    "A user's own project: it holds a data/ folder, which Python's path search takes for a namespace package."
    (tmp_path / 'data' / 'cifar10').mkdir(parents=True)
    return tmp_path


def test_the_install_brings_no_module_of_ours(elsewhere):
    "Without the checkout on the path, none of our names resolves to the checkout: pip installed none of them."
    found = python('import importlib.util as u, json\n'
                   f'print(json.dumps({{m: (s := u.find_spec(m)) and s.origin for m in {OURS!r}}}))', elsewhere)
    assert not [m for m, origin in found.items() if origin and Path(origin).parent == ROOT], found


def test_the_namesakes_are_installed(elsewhere):
    "The packages arch and interpret are in this venv, so the tests below show that ours win over them."
    found = python('import importlib.util as u, json\n'
                   f'print(json.dumps({{n: (s := u.find_spec(n)) and s.origin for n in {list(NAMESAKES)!r}}}))',
                   elsewhere)
    for name, origin in found.items():
        if not origin or 'site-packages' not in origin:
            skip_or_fail(f'the package {NAMESAKES[name]} is not installed (pip install -e ".[test]")')


def test_our_modules_import_from_the_checkout_in_any_folder(elsewhere):
    "The Python API from elsewhere, as docs/development.md says: the checkout on PYTHONPATH; ours beat arch, interpret."
    found = python('import importlib, json, warnings; warnings.simplefilter("ignore")\n'
                   f'print(json.dumps({{m: importlib.import_module(m).__file__ for m in {OURS!r}}}))',
                   elsewhere, PYTHONPATH=str(ROOT))
    assert found == {m: str(ROOT / f'{m}.py') for m in OURS}
    assert found['data'] == str(ROOT / 'data.py')  # not the data/ folder beside the user's code


def test_every_command_starts_quietly_from_any_folder(elsewhere):
    "`python <checkout>/<command> --help` in a user's folder, with no PYTHONPATH: the usage, and no warning."
    assert {'cams.py', 'app.py', 'experiments/run.py', 'tools/half_weights.py'} <= set(COMMANDS)
    # All at once: each is a fresh interpreter that imports torch and fastai (a few seconds), and there are two cores.
    procs = {c: subprocess.Popen([sys.executable, str(ROOT / c), '--help'], cwd=elsewhere, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in COMMANDS}
    failed = {}
    for c, p in procs.items():
        out, err = p.communicate(timeout=600)
        if p.returncode or err or 'usage' not in out.lower(): failed[c] = (p.returncode, err[-500:])
    assert not failed, failed


def test_importing_cli_changes_no_warning_filter():
    "Quieting fastai's import-time warning is a call each command makes (`cli.quiet_warnings`), not a side effect."
    found = python('import json, warnings\n'
                   'jit = "`torch.jit.script` is deprecated"\n'
                   'ours = lambda: [f for f in warnings.filters if f[1] and f[1].search(jit)]\n'
                   'import cli; imported = ours()\n'
                   'cli.quiet_warnings(); print(json.dumps([len(imported), len(ours())]))', ROOT)
    assert found == [0, 1]
