"""Shared fixtures: tiny image folders made on the spot, and the real CIFAR-10 unpacked once per session."""
import json, os, runpy, shutil, subprocess, sys, tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# This checkout first, ahead of any installed copy; under mutmut its mutated copy (mutants/) must stay first.
if 'MUTANT_UNDER_TEST' not in os.environ: sys.path.insert(0, str(ROOT))
CLASSES = [f'c{i}' for i in range(10)]
# The lossless copy: the JPEG one caps this network near 91% (../shared/data/README.md), so it is for nothing here.
ARCHIVE = Path(os.environ.get('CIFAR10_TGZ', ROOT.parent / 'shared' / 'data' / 'cifar10-png.tgz'))


def hand_curve(t=None):
    "A finder curve solved by hand, LRs and losses: a plateau at 2.3, then a bowl whose bottom, 1.9, is at LR 0.1."
    t = np.linspace(-6, 1, 71) if t is None else t  # log10 LR, 10 points a decade
    return 10 ** t, np.minimum(2.3, 1.9 + 0.06 * (t + 1) ** 2)


def skip_or_fail(reason):
    "Skip a test whose shared file is missing, but fail it under CI (CI=true): a green CI must have run everything."
    if os.environ.get('CI', '').lower() not in ('', '0', 'false', 'no'):
        pytest.fail(f'{reason}; CI needs it', pytrace=False)
    pytest.skip(reason)


def need_app():
    "Skip a test of the app where the [app] extra (gradio, with httpx) is not installed; fail it under CI."
    import importlib.util
    for mod in ('gradio', 'httpx'):
        if not importlib.util.find_spec(mod): skip_or_fail(f'the {mod} package is missing (pip install -e ".[app]")')


def make_folder(root, n_train=6, n_test=2, classes=CLASSES, seed=0):
    "A CIFAR-layout folder of 32×32 images whose mean colour depends on the class; PNG and JPEG mixed."
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('test', n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            base = np.array([(c * 25) % 256, (c * 80) % 256, 255 - c * 25], dtype=float)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f'{i:04d}.{"png" if i % 2 else "jpg"}')
    return root


@pytest.fixture
def tiny(tmp_path):
    "A fresh tiny CIFAR-layout folder: 10 classes, 6 train and 2 test images each."
    return make_folder(tmp_path / 'tiny')


@pytest.fixture(scope='session')
def cifar10(tmp_path_factory):
    "The real CIFAR-10 (lossless PNG copy) from ../shared, unpacked once per test session; $CIFAR10_DIR if set."
    if os.environ.get('CIFAR10_DIR'): return Path(os.environ['CIFAR10_DIR'])
    if not ARCHIVE.exists(): skip_or_fail(f'{ARCHIVE} not found (set CIFAR10_TGZ)')
    dest = tmp_path_factory.mktemp('cifar')
    with tarfile.open(ARCHIVE) as tf: tf.extractall(dest, filter='data')
    return dest / 'cifar10'


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    "A finished 1-epoch CPU run on a tiny folder of classes c0…c9 (given LRs, so no finder), beside its data/."
    root = tmp_path_factory.mktemp('tiny-run')
    data, out = make_folder(root / 'data'), root / 'run'
    r = run_script('experiments/run.py', '--data', data, '--epochs', 1, '--bs', 20, '--out', out,
                   '--lr-min', 0.01, '--lr-max', 0.1, '--seed', 0, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    return out


def run_alone(run, dest, drop=()):
    "A copy of `run` at `dest` whose recorded data folder is gone (less the files in `drop`): a run on another machine."
    shutil.copytree(run, dest)
    for f in drop: (dest / f).unlink()
    config = json.loads((dest / 'config.json').read_text())
    (dest / 'config.json').write_text(json.dumps({**config, 'data': str(dest.parent / 'gone')}))
    return dest


def run_here(capsys, script, *args):
    "A script's command line run in this process, where the imports are warm: its exit status and its stderr."
    # For the one-line errors: a fresh interpreter costs ~7 s of imports each. Tests that run a script
    # end to end, a crash or a kill included, still use `run_script`.
    argv, sys.argv = sys.argv, [str(ROOT / script), *map(str, args)]
    try: runpy.run_path(str(ROOT / script), run_name='__main__'); code = 0
    except SystemExit as e: code = e.code
    finally: sys.argv = argv
    return code, capsys.readouterr().err


def run_script(*args, timeout=600, cwd=ROOT, env=None):
    "Run a script of the suite as a user would, in a fresh process (in `cwd`, with `env` added); the CompletedProcess."
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore::FutureWarning', **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
