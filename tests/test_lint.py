"""ruff, as pyproject.toml configures it (pyflakes' rules, 120-character lines), passes on the whole checkout."""
import importlib.util, subprocess, sys

from conftest import ROOT, skip_or_fail


def ruff(*args, stdin=None):
    if not importlib.util.find_spec('ruff'): skip_or_fail('ruff is missing (pip install -e ".[test]")')
    return subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_ruff_check_passes():
    r = ruff()
    assert r.returncode == 0, r.stdout[-5000:]


def test_the_configuration_catches_what_it_is_for():
    "An unused import, an undefined name, a redefinition and a 121-character line, each caught with this config."
    bad = 'import os\nimport json\nimport json\nx = undefined_name\n' + f'y = "{"a" * 115}"\n'
    r = ruff('--output-format', 'concise', '--stdin-filename', 'bad.py', '-', stdin=bad)
    assert r.returncode == 1
    codes = {w for line in r.stdout.splitlines() for w in line.split() if w[:1] in 'FE'}
    assert {'F401', 'F811', 'F821', 'E501'} <= codes, r.stdout
