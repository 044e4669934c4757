"""tools/space.py: a run as a Hugging Face Space folder that serves as it is, with no flags, from its own pins."""
import shutil, subprocess, sys, time
from modulefinder import ModuleFinder
from pathlib import Path

import pytest

from conftest import ROOT, need_app, run_alone, run_here, run_script

sys.path.insert(0, str(ROOT / 'experiments'))
from app import PREDICTED  # noqa: E402
from app_load import Api, classify, mistakes, same  # noqa: E402


@pytest.fixture(scope='module')
def alone(tiny_run, tmp_path_factory):
    "A copy of the tiny run whose data folder is gone: in a Space, the run folder is all there is."
    return run_alone(tiny_run, tmp_path_factory.mktemp('space-run') / 'tiny-stamp')


@pytest.fixture(scope='module')
def space(alone):
    out = alone.parent / 'space'
    r = run_script('tools/space.py', '--run', alone, '--out', out)
    assert r.returncode == 0 and 'wrote' in r.stdout, r.stderr
    return out


def pins():
    lines = (line.split('#')[0].strip() for line in (ROOT / 'constraints.txt').read_text().splitlines())
    return {name.lower().replace('_', '-'): v for name, v in (line.split('==') for line in lines if line)}


def test_the_space_holds_the_app_its_modules_pins_and_run(space, alone):
    # Exactly the modules app.py imports: Python's own ModuleFinder, reading the bytecode of the Space's files alone,
    # reaches every .py there from app.py, and misses none of the checkout's (they would be its "bad modules").
    finder = ModuleFinder(path=[str(space)])
    finder.run_script(str(space / 'app.py'))
    ours = {p.stem for p in ROOT.glob('*.py')}
    found = {name for name, m in finder.modules.items() if m.__file__ and Path(m.__file__).parent == space}
    assert found - {'__main__'} == {p.stem for p in space.glob('*.py')} - {'app'}, found
    assert not ours & set(finder.badmodules), ours & set(finder.badmodules)
    assert {'arch', 'cams', 'predict', 'run_folder'} <= found and not {'callbacks', 'tensorboard_log'} & found
    # Every requirement at constraints.txt's version; the app's own direct ones and fastai's torchvision among them.
    want = pins()
    lines = [line for line in (space / 'requirements.txt').read_text().splitlines() if not line.startswith('#')]
    got = dict(line.split('==') for line in lines)
    assert all(want[name] == v for name, v in got.items()), got
    assert {'fastai', 'fastcore', 'torch', 'torchvision', 'gradio', 'pillow', 'matplotlib', 'setuptools'} <= set(got)
    assert not {'pytest', 'playwright', 'tensorboard', 'accelerate', 'ruff'} & set(got)
    # The front matter the Hub reads, for this Python and the tested Gradio.
    readme = (space / 'README.md').read_text()
    meta = dict(line.split(': ', 1) for line in readme.split('---')[1].strip().splitlines())
    assert meta['sdk'] == 'gradio' and meta['sdk_version'] == want['gradio'] and meta['app_file'] == 'app.py'
    assert meta['python_version'] == '"%d.%d"' % sys.version_info[:2]
    # The run, under runs/ where app.py looks with no flags; its binary files through the Hub's large-file storage.
    run = space / 'runs' / alone.name
    assert sorted(p.name for p in run.iterdir()) == ['config.json', 'examples', 'metrics.csv', 'mistakes.npz',
                                                     'model.pth']
    assert (run / 'model.pth').read_bytes() == (alone / 'model.pth').read_bytes()
    assert len(list((run / 'examples').glob('*.png'))) == 10
    assert '*.pth filter=lfs' in (space / '.gitattributes').read_text()


def serve_and_ask(space, alone, python, log, monkeypatch):
    "app.py started in `space` with no flags, no data set anywhere: both endpoints answer as the run does in-process."
    from cams import misclassified_cams
    from run_folder import load_mistakes, load_model
    net, classes = load_model(alone, 'cpu')
    interp, worst = load_mistakes(alone)
    want = [caption for *_, caption in misclassified_cams(net, interp, 5, 'layer3', x=worst)]
    example = sorted((space / 'runs' / alone.name / 'examples').glob('*.png'))[0]
    from predict import predict
    expected = [(p.label, p.prob) for p in predict(net, example, classes, k=3)]
    monkeypatch.setenv('CIFAR10_DIR', str(alone.parent / 'also-gone'))
    from app import serving
    with serving(None, log=log, app=space / 'app.py', python=python) as s:
        api, t = Api(s.url), time.perf_counter()
        top = classify(api, example, 'layer2', PREDICTED)[0]
        t_classify, t = time.perf_counter() - t, time.perf_counter()
        got = [caption for caption, _ in mistakes(api, 5, 'layer3')]
        t_gallery = time.perf_counter() - t
    assert same(top, expected), (top, expected)
    assert got == want, (got, want)
    assert f'serving {space / "runs" / alone.name} at' in Path(log).read_text()  # the Space's copy of the run
    return s.startup_s, t_classify, t_gallery


def test_the_space_serves_with_no_flags_and_no_data(space, alone, tmp_path, monkeypatch):
    need_app()
    startup, *_ = serve_and_ask(space, alone, sys.executable, tmp_path / 'app.log', monkeypatch)
    assert startup < 120


def test_its_errors_are_one_line(capsys, alone, tmp_path):
    code, err = run_here(capsys, 'tools/space.py', '--run', alone)
    assert code == 2 and err.strip() == 'space.py: error: --out DIR is required: the Space folder to write', err
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    code, err = run_here(capsys, 'tools/space.py', '--run', alone, '--out', tmp_path / 'full')
    assert code == 2 and 'exists and is not an empty folder' in err and len(err.strip().splitlines()) == 1, err
    bare = tmp_path / 'bare'
    shutil.copytree(alone, bare, ignore=shutil.ignore_patterns('mistakes.npz'))
    code, err = run_here(capsys, 'tools/space.py', '--run', bare, '--out', tmp_path / 'new')
    assert code == 2 and 'experiments/evaluate.py --run' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'new').exists()


@pytest.mark.space
def test_a_venv_of_its_requirements_alone_serves_it(space, alone, tmp_path, monkeypatch):
    "What a Space does: a fresh venv from requirements.txt and nothing else (6 GB, minutes), then app.py, no flags."
    venv = tmp_path / 'venv'
    t = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
    pip = subprocess.run([venv / 'bin/pip', 'install', '-q', '-r', space / 'requirements.txt'], capture_output=True,
                         text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    t_install = time.perf_counter() - t
    try:
        check = subprocess.run([venv / 'bin/pip', 'check'], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        # The venv has torch and fastai, and no module of ours: the app's come from the Space folder.
        probe = subprocess.run([venv / 'bin/python', '-c', 'import importlib.util as u, torch; '
                                'print(torch.__version__, u.find_spec("fastai") is not None, u.find_spec("arch"))'],
                               cwd=tmp_path, capture_output=True, text=True)
        assert probe.stdout.split()[1:] == ['True', 'None'], probe
        startup, t_classify, t_gallery = serve_and_ask(space, alone, venv / 'bin/python', tmp_path / 'app.log',
                                                       monkeypatch)
        size = sum(f.stat().st_size for f in venv.rglob('*') if f.is_file()) / 1e9
        print(f'\nfresh venv from the Space\'s requirements.txt: {t_install:.0f} s, {size:.1f} GB, torch '
              f'{probe.stdout.split()[0]}; app.py with no flags answered in {startup:.1f} s; first classify '
              f'{t_classify:.2f} s, first gallery {t_gallery:.2f} s')
    finally: shutil.rmtree(venv)  # 6 GB: not left for pytest's kept temporary folders
