"""The Python blocks of the README and docs/ run as written, on a tiny folder or a tiny run, so they cannot rot."""
import numpy as np
from PIL import Image

from conftest import ROOT, need_app, run_script

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
# Every ```python block of the README and docs/, by (page, the heading above it), and the test here that runs it.
# A block added without an entry here fails test_every_python_block_is_run; one that cannot run goes in NOT_RUN
# with the reason.
RUN_BY = {('docs/recipe.md', 'Interactive use'): 'test_the_interactive_snippet_runs',
          ('docs/gradcam.md', 'From Python'): 'test_the_gradcam_snippet_runs',
          ('docs/sharing.md', 'Export'): 'test_the_export_snippet_runs',
          ('README.md', 'The app from Python'): 'test_the_app_client_snippet_runs'}
NOT_RUN = {}


def python_blocks():
    "The ```python blocks of the README and docs/: (page, heading above it) → code."
    blocks = {}
    for page in PAGES:
        heading, code, other = None, None, False
        for line in page.read_text().splitlines(keepends=True):
            if code is not None:
                if line.startswith('```'):
                    key = (page.relative_to(ROOT).as_posix(), heading)
                    assert key not in blocks, f'two python blocks under {key}; give one its own heading'
                    blocks[key], code = ''.join(code), None
                else: code.append(line)
            elif other: other = not line.startswith('```')
            elif line.startswith('```python'): code = []
            elif line.startswith('```'): other = True
            elif line.startswith('#'): heading = line.lstrip('#').strip()
    return blocks


def swap(code, swaps):
    "`code` with each (old, new) replaced; an `old` the block no longer has fails, naming it."
    for old, new in swaps:
        assert old in code, f'the snippet no longer has {old!r}; update this test with it'
        code = code.replace(old, new)
    return code


def readme_snippet(data, bs, epochs, subset=None, find_iters=100):
    "The 'Interactive use' block (docs/recipe.md) on `data`, with a smaller batch, subset, epoch count and finder."
    code = python_blocks()[('docs/recipe.md', 'Interactive use')]
    for old in ("cifar_dls('data/cifar10', bs=512)", 'learn.fit_one_cycle(24,', 'learn.lr_find(suggest_funcs='):
        assert code.count(old) == 1, f'the snippet no longer has {old!r} once; update this test with it'
    code = swap(code, [("cifar_dls('data/cifar10', bs=512)", f"cifar_dls({str(data)!r}, bs={bs}, subset={subset})"),
                       ('learn.fit_one_cycle(24,', f'learn.fit_one_cycle({epochs},'),
                       ('learn.lr_find(suggest_funcs=', f'learn.lr_find(num_it={find_iters}, suggest_funcs=')])
    # The snippet's last lines show figures; the check reads what they left behind.
    return code + ('\nprint("device", dls.device, "lrmin", lrs.lrmin, "lrmax", lrs.lrmax, '
                   '"epochs", len(learn.recorder.values))\n')


def run_snippet(code, folder):
    "Run the snippet headless in a user's own folder, which holds a data/ folder, with the checkout on PYTHONPATH."
    # As docs/development.md says to use the Python API from elsewhere; the data/ folder is the one that once made
    # `import data` find a namespace package instead of data.py.
    (folder / 'data').mkdir(exist_ok=True)
    r = run_script('-c', f'import matplotlib; matplotlib.use("Agg")\n{code}', cwd=folder, env={'PYTHONPATH': str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(*[iter(r.stdout.split('\n')[-2].split())] * 2))


def photo(tmp_path):
    "A user's picture: not 32×32, so the snippet's resizing runs too."
    file = tmp_path / 'photo.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(file)
    return file


def test_every_python_block_is_run():
    assert set(python_blocks()) == set(RUN_BY) | set(NOT_RUN)
    assert all(name in globals() for name in RUN_BY.values())


def test_the_interactive_snippet_runs(tiny, tmp_path):
    out = run_snippet(readme_snippet(tiny, bs=10, epochs=2, find_iters=30), tmp_path)
    assert 0 < float(out['lrmin']) < float(out['lrmax']) and out['epochs'] == '2'


def test_the_gradcam_snippet_runs(tiny_run, tmp_path):
    picture = repr(str(photo(tmp_path)))
    code = swap(python_blocks()[('docs/gradcam.md', 'From Python')],
                [("'runs/<stamp>'", repr(str(tiny_run))), ("'photo.jpg'", picture),
                 ("classes.index('cat')", "classes.index('c3')")])  # the tiny run's classes are c0…c9
    out = run_snippet(code + f'\nprint("top", predict(model, {picture}, classes)[0].label, "shape", '
                             '"x".join(map(str, maps.shape)), "min", float(maps.min()), "max", float(maps.max()))\n',
                      tmp_path)
    assert out['top'] in [f'c{i}' for i in range(10)] and out['shape'] == '1x32x32'
    assert 0 <= float(out['min']) <= float(out['max']) <= 1


def test_the_export_snippet_runs(tiny_run, tmp_path):
    code = swap(python_blocks()[('docs/sharing.md', 'Export')],
                [("'runs/<stamp>/export.pkl'", repr(str(tiny_run / 'export.pkl'))),
                 ("'photo.jpg'", repr(str(photo(tmp_path))))])
    out = run_snippet(code + '\nprint("label", label, "idx", int(idx), "sum", float(probs.sum()))\n', tmp_path)
    assert out['label'] == f'c{out["idx"]}' and abs(float(out['sum']) - 1) < 1e-5


def test_the_app_client_snippet_runs(tiny_run, tmp_path):
    need_app()
    from app import serving
    from predict import predict
    from run_folder import load_model
    picture = str(photo(tmp_path))
    with serving(tiny_run) as server:  # app.py on a free port, as `python app.py --run` serves it
        code = swap(python_blocks()[('README.md', 'The app from Python')],
                    [("'http://127.0.0.1:7860/'", repr(server.url)), ("'photo.jpg'", repr(picture))])
        out = run_snippet(code + '\nfrom PIL import Image\nprint("label", labels["label"], "size", '
                                 '"x".join(map(str, Image.open(cams[0]["image"]).size)))\n', tmp_path)
    model, classes = load_model(tiny_run, 'cpu')
    # The answer over HTTP is the one predict() gives in-process, and the Grad-CAM picture came back at the app's 8×.
    assert out['label'] == predict(model, picture, classes)[0].label and out['size'] == '256x256'
