"""A run folder's figures and its report.md, drawn headless from the files the run wrote."""
import csv, json, os, re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no display, no global backend, nothing to close

from lrfind import DESCENT

__all__ = ['read_csv', 'save_json', 'save_figure', 'plot_lr_find', 'plot_schedule', 'plot_curves', 'write_report',
           'marked', 'put_section', 'evaluation_section', 'headline']

DPI = 100


def read_csv(path):
    "Rows of a csv file as dicts of floats."
    with open(path, newline='') as fh: return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def save_json(path, obj):
    "Write `obj` as JSON atomically: a kill mid-write leaves the old file."
    tmp = Path(path).with_suffix('.tmp')
    tmp.write_text(json.dumps(obj, indent=2, default=str) + '\n')
    os.replace(tmp, path)


def save_figure(fig, path):
    "Lay out and save a `Figure` as a PNG; returns the path."
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return Path(path)


def plot_lr_find(found, path, title=None):
    "The finder's loss against LR, with fastai's four suggestions, the rule's construction and LRMIN and LRMAX marked."
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    lrs, losses = found.lrs[:-5] or found.lrs, found.losses[:-5] or found.losses  # fastai's skip_end=5
    ax.plot(lrs, losses, color='tab:blue')
    for (name, lr), m in zip(found.suggestions.items(), 'ov^s'):
        if lr != lr: continue  # NaN: the curve was too short for this suggestion
        ax.plot([lr], [_interp(lr, lrs, losses)], m, ms=8, label=f'{name} {lr:.2e}')
    c = found.construction
    if c is not None and c.fit:  # the rule's construction: the fitted parabola and the descent's threshold
        lo, hi, a, b, k = c.fit
        t = np.linspace(np.log10(lo), np.log10(hi), 50)
        ax.plot(10 ** t, a * t ** 2 + b * t + k, color='tab:red', lw=2.5, alpha=0.35,
                label='parabola around the lowest loss')
    if c is not None:
        ax.axhline(c.threshold, color='tab:green', ls=':', lw=1, label=f'plateau − {DESCENT:.0%} of the drop')
    ax.axvline(found.lr_min, color='tab:green', ls='--', label=f'LRMIN {found.lr_min:.2e}')
    ax.axvline(found.lr_max, color='tab:red', ls='--', label=f'LRMAX {found.lr_max:.2e}')
    ax.set(xscale='log', xlabel='learning rate', ylabel='smoothed training loss', title=title or 'lr_find')
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _interp(x, xs, ys):
    "The value of the curve (xs, ys) at the first xs ≥ x; the marker then sits on the drawn line."
    return next((y for xi, y in zip(xs, ys) if xi >= x), ys[-1] if ys else float('nan'))


def plot_schedule(rows, path, lr_min, lr_max, peak_epoch):
    "The one-cycle LR per step against epochs, with the peak epoch, LRMIN and LRMAX marked."
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot([r['epoch'] for r in rows], [r['lr'] for r in rows], color='tab:blue', label='LR per step')
    ax.axvline(peak_epoch, color='grey', ls=':', label=f'peak at epoch {peak_epoch:g}')
    ax.axhline(lr_max, color='tab:red', ls='--', lw=0.8, label=f'LRMAX {lr_max:.3g}')
    ax.axhline(lr_min, color='tab:green', ls='--', lw=0.8, label=f'LRMIN {lr_min:.3g}')
    ax.set(xlabel='epoch', ylabel='learning rate', title='one-cycle schedule (no annihilation)')
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(rows, path):
    "Train and test loss and accuracy per epoch, side by side."
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ep = [r['epoch'] for r in rows]
    # Like with like: the epoch's mean training loss against the test set's mean loss (runs before it was logged
    # have only fastai's smoothed loss, and say so).
    train_loss = 'train_loss_mean' if 'train_loss_mean' in rows[0] else 'train_loss'
    ax_loss.plot(ep, [r[train_loss] for r in rows], '-o', ms=3,
                 label='train (epoch mean)' if train_loss == 'train_loss_mean' else 'train (smoothed)')
    ax_loss.plot(ep, [r['test_loss'] for r in rows], '-s', ms=3, label='test (mean)')
    for split, style in (('train', '-o'), ('test', '-s')):
        ax_acc.plot(ep, [100 * r[f'{split}_acc'] for r in rows], style, ms=3, label=split)
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax_loss, ax_acc): ax.legend(); ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(folder, config, found, sections=()):
    "Write report.md: the headline numbers, then every figure of the run folder, then any extra `sections`."
    folder = Path(folder)
    rows = read_csv(folder / 'metrics.csv') if (folder / 'metrics.csv').exists() else []
    last = rows[-1] if rows else {}
    best = max(rows, key=lambda r: r['test_acc']) if rows else {}
    lines = [f"# Run {folder.name}", '',
             f"custom ResNet on CIFAR-10, {config['epochs']} epochs at batch {config['bs']}"
             + (f", subset {config['subset']}" if config.get('subset') else '')
             + f", on {config['device_name']}.", '',
             '| | |', '|---|---|']
    final = config.get('test_metrics') or {}
    if rows:
        lines += [f"| final test accuracy | **{100 * last['test_acc']:.2f}%** (epoch {last['epoch']:.0f}) |"]
        if 'test_acc_tta' in final: lines += [f"| with mirror TTA | {100 * final['test_acc_tta']:.2f}% |"]
        if 'ece' in final: lines += [f"| calibration error (ECE) | {100 * final['ece']:.2f}% |"]
        lines += [
                  f"| best test accuracy | {100 * best['test_acc']:.2f}% (epoch {best['epoch']:.0f}) |",
                  f"| final train accuracy | {100 * last['train_acc']:.2f}% |",
                  f"| training time | {sum(r['seconds'] for r in rows):.1f} s ({len(rows)} epochs) |"]
    lines += [f"| LRMIN, LRMAX | {found['lr_min']:.3g}, {found['lr_max']:.3g} ({found.get('rule', 'given')}) |",
              f"| seed | {config['seed']} |", f"| git commit | `{config['git_commit']}` |", '']
    if found.get('suggestions'):
        lines += ['## Learning-rate finder', '', '| suggestion | LR |', '|---|---|']
        lines += [f'| {k} | {"n/a (curve too short)" if v is None else f"{v:.3g}"} |'
                  for k, v in found['suggestions'].items()]
        lines += ['', '![lr_find](lr_find.png)', '']
    lines += ['## Schedule', '', '![schedule](schedule.png)', '', '## Curves', '', '![curves](curves.png)', '']
    if rows:
        lines += ['## Epochs', '', '| ' + ' | '.join(rows[0]) + ' |', '|' + '---|' * len(rows[0])]
        lines += ['| ' + ' | '.join(_fmt(k, v) for k, v in r.items()) + ' |' for r in rows]
        lines += ['']
    for s in sections: lines += [s, '']
    lines += ['## Files', '', '`metrics.csv`, `schedule.csv`, `lr_find.json`, `config.json`, `summary.txt`, '
              '`model.pth` (a `custom_resnet()` state_dict).', '']
    (folder / 'report.md').write_text('\n'.join(lines))
    return folder / 'report.md'


def marked(key, lines):
    "A report.md section: `lines` between the markers named `key`, which `put_section` finds again."
    return '\n'.join([f'<!-- {key} -->', *lines, f'<!-- /{key} -->'])


def put_section(report, section):
    "Put `section` (from `marked`) into report.md in place of the one with the same markers, else at the end."
    report, start = Path(report), section.split('\n', 1)[0]
    end = start.replace('<!-- ', '<!-- /', 1)
    text = report.read_text() if report.exists() else ''
    pattern = re.compile(f'{re.escape(start)}.*?{re.escape(end)}', flags=re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip('\n') + '\n\n' + section
    report.write_text(text.rstrip('\n') + '\n')


def evaluation_section(m, figure='calibration.png'):
    "report.md's section on the final model's test numbers `m` (`predict.evaluate`'s metrics) and reliability diagram."
    rows = [('accuracy', f"{100 * m['test_acc']:.2f}%", "the recipe's number: each test image once, as trained")]
    if 'test_acc_tta' in m:
        rows.append(('accuracy, mirror TTA', f"{100 * m['test_acc_tta']:.2f}%",
                     'the mean of the logits of each image and of its left-right mirror (cifar10-fast\'s TTA)'))
    rows += [('expected calibration error', f"{100 * m['ece']:.2f}%",
              'the mean gap between confidence and accuracy, 15 equal-width bins on the top class (Guo et al. 2017)'),
             ('negative log-likelihood', f"{m['nll']:.4f}", 'the mean of −log p(true class): the test loss')]
    return marked('evaluation', ['## Final test evaluation', '',
             f"All {m['n_images']:,} test images, in {m.get('precision', 'the run’s precision')}; "
             'the calibration is that of the plain (no TTA) probabilities.', '',
             '| measure | value | what it is |', '|---|---|---|', *[f'| {a} | {b} | {c} |' for a, b, c in rows], '',
             f'![reliability diagram]({figure})'])


def _fmt(k, v):
    if k == 'epoch': return f'{v:.0f}'
    if k.endswith('acc'): return f'{100 * v:.2f}%'
    if k == 'lr': return f'{v:.4g}'
    return f'{v:.4f}' if k.endswith('loss') else f'{v:.1f}'


def headline(run):
    "A run's result in one line, from its metrics.csv and config.json: test accuracy, epochs and device."
    run = Path(run)
    config, rows = json.loads((run / 'config.json').read_text()), read_csv(run / 'metrics.csv')
    device = config.get('device', '?')
    if config.get('device_name') and config['device_name'] != device: device += f' ({config["device_name"]})'
    tta = config.get('test_metrics', {}).get('test_acc_tta')
    return (f'test accuracy {100 * rows[-1]["test_acc"]:.2f}%' + (f' ({100 * tta:.2f}% with mirror TTA)' if tta else '')
            + f' after {len(rows)} of {config.get("epochs", len(rows))} epochs on {device}; '
            f'{config.get("n_train", "?")} training and {config.get("n_test", "?")} test images')
