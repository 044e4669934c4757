"""app.py in a real browser (headless Chromium via Playwright), its one-line errors, that it imports without gradio."""
import importlib.util, json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import percent
from conftest import ROOT, run_here

sys.path.insert(0, str(ROOT / 'tools'))
from app_screenshot import CHROMIUM, local_page  # noqa: E402


def need(what, ok):
    "Skip without `what`, except under CI (env CI set), where the browser test must run: there it fails."
    if ok: return
    if os.environ.get('CI'): pytest.fail(f'{what} is missing, and CI must run the browser test (see .ci/run)')
    pytest.skip(f'{what} is missing (apt-get install chromium; pip install -e ".[test,app]")')


@pytest.fixture(scope='module')
def browser_ready():
    "The browser test's needs: Debian's chromium, playwright and gradio."
    need(CHROMIUM, Path(CHROMIUM).exists() or shutil.which('chromium'))
    for mod in ('playwright', 'gradio'): need(f'the {mod} package', importlib.util.find_spec(mod))
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which('chromium')


@pytest.fixture(scope='module')
def served(tiny_run, browser_ready, tmp_path_factory):
    "app.py serving the session's tiny run on a free port of 127.0.0.1."
    from app import serving
    log = tmp_path_factory.mktemp('app') / 'app.log'
    try:
        with serving(tiny_run, log=log) as server: yield server.url
    except (RuntimeError, TimeoutError) as e: pytest.fail(f'{e}\n{log.read_text()[-3000:]}')


def test_in_the_browser(served, browser_ready, tiny_run, tmp_path):
    "Upload an image, read its label and its Grad-CAM per layer, survive a broken and a too big file, see the mistakes."
    from interpret import interpret
    from run_folder import load_run
    from data import scan_folder
    from predict import predict
    from run_folder import load_model
    odd = tmp_path / 'odd size.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (41, 57, 3), dtype=np.uint8)).save(odd)
    broken = tmp_path / 'broken.png'
    broken.write_bytes(odd.read_bytes()[:200])  # a truncated PNG
    model, classes = load_model(tiny_run, 'cpu')
    want, prob = predict(model, odd, classes, k=1)[0]
    with local_page(browser_ready) as (page, outside):
        page.goto(served)
        assert 'test accuracy' in page.inner_text('#headline')

        page.set_input_files('#upload input[type=file]', odd)
        page.wait_for_selector('#cams img', timeout=120_000)
        assert page.inner_text('#prediction [data-testid=label-output-value]').strip() == want
        # The numbers shown are the table's, with one decimal; the label's whole-percent rounding is hidden.
        assert f'{want} {percent(prob)}' in page.inner_text('#table')
        assert not page.locator('#prediction .confidence').first.is_visible()
        assert f'Grad-CAM of {want} at layer3' in page.inner_text('#cams')
        before = page.get_attribute('#cams img', 'src')

        page.locator('#layer label', has_text='layer1').click()
        page.wait_for_function('s => { const i = document.querySelector("#cams img"); return i && i.src !== s }',
                               arg=before, timeout=60_000)
        assert f'Grad-CAM of {want} at layer1' in page.inner_text('#cams')

        page.set_input_files('#upload input[type=file]', broken)
        error = page.get_by_text('broken.png cannot be read')
        error.wait_for(timeout=60_000)  # Gradio's error toast, in the page
        huge = tmp_path / 'huge.png'
        huge.write_bytes(np.random.default_rng(2).bytes(11 * 2**20))  # over the default limit of 10 MB
        page.set_input_files('#upload input[type=file]', huge)
        page.get_by_text('exceed the maximum allowed size of 10.0 Mb: "huge.png"').wait_for(timeout=60_000)
        page.set_input_files('#upload input[type=file]', odd)  # and the app still serves
        page.wait_for_function('w => document.querySelector("#prediction [data-testid=label-output-value]")'
                               '?.textContent.trim() === w', arg=want, timeout=60_000)

        page.get_by_role('button', name='03_c2.png').click()  # an example: the first test image of class c2
        page.wait_for_function('() => document.querySelector("#cams")?.textContent.includes("03_c2.png")',
                               timeout=60_000)
        third = scan_folder(tiny_run.parent / 'data')[1]['test'][0][4]  # test images sorted by class: c2's first
        assert page.inner_text('#prediction [data-testid=label-output-value]').strip() == \
            predict(model, third, classes, k=1)[0].label
        page.get_by_role('tab', name='Misclassified test images').click()
        page.click('#show-mistakes')
        interp = interpret(load_run(tiny_run, device='cpu'))
        wrong = min(10, int((interp.decoded != interp.targs).sum()))
        assert wrong > 0
        page.wait_for_function('n => document.querySelectorAll("#mistakes img").length === n', arg=wrong,
                               timeout=120_000)
        assert 'predicted' in page.inner_text('#mistakes')
    assert outside == [], f'the page tried to load from outside the machine: {outside}'


def test_percent_has_one_decimal_and_never_rounds_up_to_certainty():
    assert [percent(p) for p in (0.9996, 0.99999, 1.0, 0.123, 0.5, 0.0004, 0.0)] == \
        ['99.9%', '99.9%', '100.0%', '12.3%', '50.0%', '0.0%', '0.0%']


def test_a_bad_run_is_one_line_before_any_server(capsys, tmp_path):
    code, err = run_here(capsys, 'app.py', '--run', tmp_path / 'nope')
    assert code == 2 and err.strip() == f'app.py: error: --run {tmp_path / "nope"} does not exist'
    (tmp_path / 'unfinished').mkdir()
    (tmp_path / 'unfinished' / 'config.json').write_text(json.dumps({}))
    code, err = run_here(capsys, 'app.py', '--run', tmp_path / 'unfinished')
    assert code == 2 and err.count('\n') == 1 and 'has no model.pth' in err


def test_importing_app_needs_no_gradio():
    "`import app` works where gradio is not installed, and only app.py imports it; building the app needs it."
    code = ("import sys; sys.modules['gradio'] = None\n"  # `import gradio` now raises ImportError
            "import app\n"
            "try: app.build(None)\n"
            "except ImportError: print('gradio needed to build')\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'gradio needed to build'
    # The package's modules never import it (importing each here would cost seconds; their source says enough).
    assert [p.name for p in ROOT.glob('*.py') if 'gradio' in p.read_text() and p.name != 'app.py'] == []
