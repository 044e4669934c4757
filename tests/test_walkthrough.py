"""The walkthrough notebook runs top to bottom on its quick CPU setting, in a kernel of this venv, so it cannot rot."""
import re, sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from conftest import ROOT, run_script
from report import read_csv

NOTEBOOK = ROOT / 'experiments' / 'walkthrough.ipynb'
SHIPPED = ROOT / 'results' / 'cpu-bf16-seed0'
TABLE = (Path(__file__).parent / 'data' / 'assignment_summary.txt').read_text().rstrip('\n')
sys.path.insert(0, str(ROOT / 'tools'))
from walkthrough_figures import tagged_pngs  # noqa: E402


def text(cell):
    "Everything a cell printed or displayed as text."
    return ''.join(o.get('text', '') + o.get('data', {}).get('text/plain', '') for o in cell.outputs)


def images(cell): return sum('image/png' in o.get('data', {}) for o in cell.outputs)


def cell_with(nb, source):
    "The one code cell whose source contains `source`."
    found = [c for c in nb.cells if c.cell_type == 'code' and source in c.source]
    assert len(found) == 1, f'{len(found)} cells contain {source!r}; update this test with the notebook'
    return found[0]


def test_the_walkthrough_runs_top_to_bottom_on_the_quick_setting(cifar10, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The committed copy is set to the shipped run (its outputs); CI runs the same cells on the quick setting.
    settings = cell_with(nb, 'SUBSET, EPOCHS, BS, FIND_ITERS =')
    assert re.search(r"^SETTING = 'shipped'", settings.source, re.M)
    settings.source = settings.source.replace("SETTING = 'shipped'", "SETTING = 'quick'", 1)
    # ipykernel's own `python3` spec in this venv says plain `python`, which jupyter_client runs as sys.executable;
    # a spec naming another interpreter would test that one's packages instead.
    argv0 = KernelSpecManager().get_kernel_spec('python3').argv[0]
    assert argv0 in ('python', 'python3', sys.executable), f'the python3 kernel runs {argv0}, not {sys.executable}'
    monkeypatch.setenv('CIFAR10_DIR', str(cifar10))  # the kernel inherits this process's environment
    # The timeout is per cell; a failing cell raises CellExecutionError with its traceback.
    NotebookClient(nb, kernel_name='python3', timeout=120,
                   resources={'metadata': {'path': str(ROOT / 'experiments')}}).execute()
    assert not [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error']
    summary = text(cell_with(nb, 'learn.summary()'))
    assert 'Total params: 6,573,120' in summary and TABLE in summary
    lr_min, lr_max = map(float, re.search(r'LRMIN (\S+), LRMAX (\S+)\n', text(cell_with(nb, 'lr_find('))).groups())
    assert 0 < lr_min < lr_max
    fit = ''.join(o.get('data', {}).get('text/html', '') for o in cell_with(nb, 'fit_one_cycle(').outputs)
    epochs = re.findall(r'<tr>\s*<td>(\d+)</td>', fit)  # fastai's table: a row per epoch, numbered from 0
    assert 'accuracy' in fit and len(epochs) >= 2 and epochs == [str(i) for i in range(len(epochs))]
    for source in ('show_batch(', 'lr_find(', 'plot_sched()', 'plot_loss()', 'plot_top_losses(',
                   'plot_confusion_matrix(', "'layer3')", "'layer2')"):
        assert images(cell_with(nb, source)) >= 1, f'the cell with {source} showed no figure'
    assert "('" in text(cell_with(nb, 'most_confused()'))  # (true, predicted, count) pairs
    assert {name for name, _ in tagged_pngs(nb)} == {'lr_find', 'gradcam_layer3'}


def test_the_figures_in_results_are_the_committed_notebooks(tmp_path):
    r = run_script(ROOT / 'tools' / 'walkthrough_figures.py', '--out', tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ('lr_find', 'gradcam_layer3'):  # docs/ shows lr_find.png: both must be this notebook's, byte for byte
        assert (tmp_path / f'{name}.png').read_bytes() == \
            (ROOT / 'results' / 'walkthrough' / f'{name}.png').read_bytes()


def test_the_committed_outputs_are_the_shipped_models():
    "What a visitor reads: the finder on all 50,000 images, then the shipped run's table, mistakes and Grad-CAM."
    nb = nbformat.read(NOTEBOOK, as_version=4)
    setting = "setting 'shipped': subset None, 24 epochs at batch 512, 100 finder steps"
    assert setting in text(cell_with(nb, 'date.today()'))
    assert '50,000 training and 10,000 test images' in text(cell_with(nb, 'cifar_dls('))
    assert re.search(r'LRMIN (\S+), LRMAX (\S+)\n', text(cell_with(nb, 'lr_find(')))
    table = ''.join(o.get('data', {}).get('text/html', '') for o in cell_with(nb, 'fit_one_cycle(').outputs)
    last = read_csv(SHIPPED / 'metrics.csv')[-1]
    assert len(re.findall(r'<tr>\s*<th>\d+</th>', table)) == 24 and f'{last["test_acc"]:.4f}' in table
    for source in ('plot_sched()', 'plot_loss()', 'plot_top_losses(', 'plot_confusion_matrix(', "'layer3')",
                   "'layer2')"):
        assert images(cell_with(nb, source)) >= 1, f'the cell with {source} shows no figure'
    assert 'shipped' in nb.cells[1].source  # the notebook says at the top where its outputs come from
