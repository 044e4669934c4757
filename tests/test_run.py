"""experiments/run.py end to end, as a user runs it: every file of the run folder, and one-line errors."""
import csv, json

import pytest
import torch
from PIL import Image

from arch import custom_resnet
from conftest import run_here, run_script
from lrfind import from_curve
from run_folder import load_mistakes

FILES = ['metrics.csv', 'lr_find.json', 'lr_find.png', 'schedule.csv', 'schedule.png', 'curves.png', 'model.pth',
         'export.pkl', 'summary.txt', 'config.json', 'report.md', 'misclassified.png', 'confusion.png',
         'receptive_field.png', 'receptive_field.json', 'examples', 'calibration.png', 'mistakes.npz']


def check_run_folder(out, epochs, finder=True):
    "Every file of a finished run folder is there and says what it should."
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for png in out.glob('*.png'):
        w, h = Image.open(png).size
        assert w >= 200 and h >= 150, png
    # The app's examples (it starts without the data set): a 32×32 test image of each class, named by its class.
    classes = json.loads((out / 'config.json').read_text())['classes']
    examples = sorted((out / 'examples').iterdir())
    assert [p.name for p in examples] == [f'{i + 1:02d}_{c}.png' for i, c in enumerate(classes)]
    assert all(Image.open(p).size == (32, 32) for p in examples)
    with open(out / 'metrics.csv') as fh: rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ['epoch', 'lr', 'train_loss', 'train_loss_mean', 'train_acc', 'test_loss', 'test_acc',
                             'seconds']
    assert [int(r['epoch']) for r in rows] == list(range(1, epochs + 1))
    lr = json.loads((out / 'lr_find.json').read_text())
    if finder:
        assert set(lr['suggestions']) == {'minimum', 'steep', 'valley', 'slide'}
        # the whole curve is kept, so the choice can be checked again later
        again = from_curve(lr['lrs'], lr['losses'], lr['num_it'])
        assert len(lr['lrs']) == len(lr['losses']) > 0 and (again.lr_min, again.lr_max) == (lr['lr_min'], lr['lr_max'])
    with open(out / 'schedule.csv') as fh: sched = [float(r['lr']) for r in csv.DictReader(fh)]
    assert sched[0] == pytest.approx(lr['lr_min']) and min(sched) >= lr['lr_min'] * (1 - 1e-9)
    assert max(sched) <= lr['lr_max'] * (1 + 1e-9) and sched[-1] < max(sched)
    custom_resnet().load_state_dict(torch.load(out / 'model.pth'))
    config = json.loads((out / 'config.json').read_text())
    assert {'epochs', 'bs', 'seed', 'device', 'versions', 'git_commit', 'seconds'} <= set(config)
    assert {'data', 'train', 'total'} <= set(config['seconds'])
    report = (out / 'report.md').read_text()
    assert all(f'({p.name})' in report for p in out.glob('*.png'))
    assert 'Total params: 6,573,120' in (out / 'summary.txt').read_text()
    assert 'it first covers the whole input at Conv2d-22' in (out / 'summary.txt').read_text()
    assert '## Receptive fields' in report and '    MaxPool2d-28             1     32     88' in report
    fields = json.loads((out / 'receptive_field.json').read_text())
    assert fields['n_images'] == min(256, config['n_test'])
    assert list(fields['blocks']) == ['prep', 'layer1', 'layer2', 'layer3']
    assert 'receptive_field' in config['seconds']
    # The final evaluation is the last epoch's own pass over the test set, plus the mirrored one and the calibration.
    final = config['test_metrics']
    # The same model on the same batches; on a GPU, cuDNN may pick other kernels, which can move one image.
    assert final['test_acc'] == pytest.approx(float(rows[-1]['test_acc']), abs=1.01 / config['n_test'])
    assert final['nll'] == pytest.approx(float(rows[-1]['test_loss']), rel=1e-3) and 0 <= final['ece'] <= 1
    assert final['n_images'] == config['n_test']
    assert 0 <= final['test_acc_tta'] <= 1 and 'evaluate' in config['seconds']
    # What the app's misclassified gallery reads instead of the data set: every test image's prediction (those of the
    # last epoch, the same tolerance as above), and the inputs of the worst mistakes.
    kept, worst = load_mistakes(out)
    assert kept.preds.shape == (config['n_test'], len(classes)) and torch.equal(kept.decoded, kept.preds.argmax(1))
    acc = (kept.decoded == kept.targs).float().mean().item()
    assert acc == pytest.approx(float(rows[-1]['test_acc']), abs=1.01 / config['n_test'])
    assert worst.shape == (min(50, int((kept.decoded != kept.targs).sum())), 3, 32, 32)
    assert (out / 'mistakes.npz').stat().st_size < 2e6
    assert '## Final test evaluation' in report
    assert f"| accuracy, mirror TTA | {100 * final['test_acc_tta']:.2f}% |" in report
    return rows, config


def test_run_on_a_tiny_folder_leaves_every_file(tiny, tmp_path):
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', tiny, '--epochs', 2, '--bs', 10, '--out', out,
                   '--find-iters', 12, '--seed', 1)
    assert r.returncode == 0, r.stderr
    rows, config = check_run_folder(out, 2)
    assert config['seed'] == 1 and config['n_train'] == 60
    assert 'lr_find:' in r.stdout and 'ETA:' in r.stdout and 'test accuracy' in r.stdout
    assert 'epoch' in r.stdout and '█' not in r.stdout  # fastai's table, without bars in a log


def test_run_on_a_subset_of_real_cifar(cifar10, tmp_path):
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', cifar10, '--epochs', 2, '--subset', 100, '--bs', 20,
                   '--out', out, '--find-iters', 12)
    assert r.returncode == 0, r.stderr
    rows, config = check_run_folder(out, 2)
    assert (config['n_train'], config['n_test']) == (100, 20)


def test_given_lrs_skip_the_finder(tiny, tmp_path):
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', tiny, '--epochs', 1, '--bs', 20, '--out', out,
                   '--lr-min', 0.01, '--lr-max', 0.1)
    assert r.returncode == 0, r.stderr
    assert 'lr_find:' not in r.stdout
    lr = json.loads((out / 'lr_find.json').read_text())
    assert (lr['lr_min'], lr['lr_max'], lr['suggestions']) == (0.01, 0.1, None)


@pytest.mark.parametrize('args,message', [
    (['--data', '/no/such/folder'], 'data folder /no/such/folder does not exist'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--lr-min', '0.1', '--lr-max', '0.01'], 'must be below --lr-max'),
    (['--lr-min', '0.1'], 'give both --lr-min and --lr-max'),
    (['--subset', '5'], '--subset 5 is smaller than the number of classes (10)'),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tiny, tmp_path, capsys, args, message):
    out = tmp_path / 'run'
    data = [] if '--data' in args else ['--data', tiny]
    code, err = run_here(capsys, 'experiments/run.py', *data, *args, '--out', out)
    assert code == 2 and err.strip().splitlines() == [f'run.py: error: {err.strip().split("error: ", 1)[1]}']
    assert message in err and not out.exists()


def test_tensorboard_logs_steps_epochs_and_figures(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'run'
    r = run_script('experiments/run.py', '--data', tiny, '--epochs', 2, '--bs', 20, '--out', out, '--find-iters', 12,
                   '--seed', 0, '--tensorboard')
    assert r.returncode == 0, r.stderr
    events = EventAccumulator(str(out / 'tensorboard'), size_guidance={'scalars': 0, 'images': 0}).Reload()
    with open(out / 'schedule.csv') as fh: sched = list(csv.DictReader(fh))
    lrs = events.Scalars('step/lr')
    assert [e.step for e in lrs] == [int(s['step']) + 1 for s in sched]  # every training step, counted from 1
    assert [e.value for e in lrs] == pytest.approx([float(s['lr']) for s in sched], rel=1e-6)
    assert len(events.Scalars('step/train_loss_smoothed')) == len(sched)
    with open(out / 'metrics.csv') as fh: metrics = list(csv.DictReader(fh))
    for name in ('train_loss', 'train_loss_mean', 'train_acc', 'test_loss', 'test_acc'):
        got = events.Scalars(f'epoch/{name}')
        assert [e.step for e in got] == [1, 2]
        assert [e.value for e in got] == pytest.approx([float(m[name]) for m in metrics], rel=1e-5)
    assert {'figures/lr_find', 'figures/confusion', 'figures/misclassified'} <= set(events.Tags()['images'])


