"""The recipe that makes 94%: a training batch's augmentations, the optimizer, the loss's scale, what is shown."""
import json, re
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from fastai.optimizer import SGD
from fastai.torch_core import set_seed
from fastai.vision.core import cifar_stats

import lrfind
from conftest import ROOT, hand_curve, make_folder
from data import cifar_dls
from interpret import denorm, interpret, most_confused, plot_confusion, plot_misclassified, top_misclassified
from train import ScaledCrossEntropy, cifar_learner, fit_assignment, one_cycle_kwargs

PAD, SQUARE = 4, 8  # the recipe's reflection padding and Cutout square


def normalized(x):
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    return (x.float() / 255 - mean) / std


@pytest.fixture(scope='module')
def tiny_dls(tmp_path_factory):
    return cifar_dls(make_folder(tmp_path_factory.mktemp('recipe') / 'tiny'), bs=60, device='cpu', seed=0,
                     verbose=False)


def explain(out, src):
    "How training image `out` came from source `src`: (crop offsets, mirrored?) pairs that fit, and the Cutout mask."
    square = (out == 0).all(0)  # the dataset mean is 0 once normalized; no pixel of these images is exactly the mean
    padded = F.pad(src[None], (PAD,) * 4, mode='reflect')[0]
    h, w = src.shape[-2:]
    fits = []
    for mirrored in (False, True):
        for dy in range(2 * PAD + 1):
            for dx in range(2 * PAD + 1):
                crop = padded[:, dy:dy + h, dx:dx + w]
                if mirrored: crop = crop.flip(-1)
                if torch.allclose(out[:, ~square], crop[:, ~square], atol=1e-5): fits.append(((dy, dx), mirrored))
    return fits, square


def test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square(tiny_dls):
    dl = tiny_dls.train.new(shuffle=False, drop_last=False)  # image i of the batch is training image i
    torch.manual_seed(0)
    x, _ = dl.one_batch()
    sources = normalized(dl.images[dl.rows[:len(x)]])
    crops, mirrored = set(), set()
    for out, src in zip(x, sources):
        fits, square = explain(out, src)
        # Cutout after Normalize: exactly one 8×8 square of 0, the dataset mean
        # (before Normalize it would be -mean/std).
        ys, xs = torch.nonzero(square, as_tuple=True)
        assert len(ys) == SQUARE ** 2 and ys.max() - ys.min() == SQUARE - 1 and xs.max() - xs.min() == SQUARE - 1
        assert fits, 'an image that is no reflect-padded crop of its source, nor of its mirror'
        crops |= {offset for offset, _ in fits}
        mirrored |= {m for _, m in fits} if len(fits) == 1 else set()
    assert mirrored == {False, True}  # flips happen, per image: both orientations in one batch
    assert len(crops) > 10  # the crops vary (81 possible offsets)


def test_validation_batches_are_only_normalized(tiny_dls):
    x, _ = tiny_dls.valid.one_batch()
    assert torch.allclose(x, normalized(tiny_dls.valid.images[tiny_dls.valid.rows[:len(x)]]), atol=1e-5)


# ---- optimizer and loss -----------------------------------------------------------------------------------------

@pytest.fixture
def learn(tiny_dls):
    set_seed(0)
    return cifar_learner(tiny_dls)


def test_the_optimizer_is_torch_sgd_with_nesterov_momentum_and_l2_decay(learn):
    learn.create_opt()
    opt = learn.opt.opt
    assert type(opt) is torch.optim.SGD
    for group in opt.param_groups:
        assert group['nesterov'] is True and group['momentum'] == 0.9 and group['dampening'] == 0
        assert group['weight_decay'] == 5e-4  # from create_opt on, not only once fit sets it
    assert learn.wd == 5e-4 and learn.moms == (0.9, 0.9, 0.9)  # what fit_one_cycle schedules: momentum held flat


def bn_weights(model): return [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def zero_gradient_step(learn, lr=0.1):
    "One optimizer step with every gradient 0 and the hyper-parameters fit sets: weight decay alone moves the weights."
    learn.create_opt()
    learn.opt.set_hypers(lr=lr, wd=learn.wd)
    before = [w.detach().clone() for w in bn_weights(learn.model)]
    for p in learn.model.parameters(): p.grad = torch.zeros_like(p)
    learn.opt.step()
    return before


def test_bn_weights_decay_by_the_l2_nesterov_step(learn):
    lr, wd, mom = 0.1, 5e-4, 0.9
    before = zero_gradient_step(learn, lr)
    # L2 decay adds wd·w to the gradient; Nesterov's first step applies it (1 + momentum) times.
    for w, b in zip(bn_weights(learn.model), before):
        assert torch.allclose(w, b * (1 - lr * wd * (1 + mom)), rtol=0, atol=1e-7)


def test_bn_weights_still_decay_with_fastais_own_sgd(learn):
    # fastai's SGD reads the learner's `wd_bn_bias`; torch's ignores it, so only this swap shows the setting.
    learn.opt_func = partial(SGD, mom=0.9)
    before = zero_gradient_step(learn)
    for w, b in zip(bn_weights(learn.model), before): assert (w < b).all()


def test_the_loss_and_its_activation_scale_the_logits_by_one_eighth(learn):
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10) * 20, torch.randint(0, 10, (16,))
    assert learn.loss_func.scale == 0.125
    assert torch.allclose(learn.loss_func(logits, y), F.cross_entropy(logits / 8, y))
    assert torch.allclose(learn.loss_func.activation(logits), F.softmax(logits / 8, dim=-1))


def test_the_losss_own_defaults_and_settings_reach_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10) * 20, torch.randint(0, 10, (16,))
    assert torch.allclose(ScaledCrossEntropy()(logits, y), F.cross_entropy(logits / 8, y))  # ×0.125, no smoothing
    assert torch.allclose(ScaledCrossEntropy(label_smoothing=0.1)(logits, y),
                          F.cross_entropy(logits / 8, y, label_smoothing=0.1))
    assert torch.allclose(ScaledCrossEntropy(reduction='sum')(logits, y),
                          F.cross_entropy(logits / 8, y, reduction='sum'))
    # a call's keywords reach torch, as fastai's do
    with pytest.raises(TypeError, match="keyword argument 'reduce_to'"):
        ScaledCrossEntropy()(logits, y, reduce_to='sum')
    z = torch.randn(2, 3, 10)  # a softmax over the classes, the last axis, whatever the batch's shape
    assert torch.allclose(ScaledCrossEntropy(scale=0.5).activation(z), F.softmax(z / 2, dim=-1))


def test_the_learners_settings_reach_fastai(tiny_dls, tmp_path):
    from fastai.callback.core import Callback
    from fastai.metrics import accuracy
    from precision import BF16, ChannelsLastBatches
    from train import DeviceAvgMetric

    class Probe(Callback): pass
    set_seed(0)
    default = cifar_learner(tiny_dls)
    assert default.path == Path('.') and default.model_dir == '.'  # checkpoints beside the run's files, not in models/
    assert [type(m) for m in default.metrics] == [DeviceAvgMetric] and default.metrics[0].func is accuracy
    assert default.recorder.train_metrics is True  # train_accuracy, a column of metrics.csv
    assert not any(isinstance(cb, (BF16, ChannelsLastBatches)) for cb in default.cbs)  # fp32, contiguous by default
    model, probe = default.model, Probe()
    learn = cifar_learner(tiny_dls, model=model, path=tmp_path, cbs=[probe], label_smoothing=0.1, precision='bf16',
                          channels_last=True)
    assert learn.model is model and learn.path == tmp_path and probe in learn.cbs
    assert sum(isinstance(cb, BF16) for cb in learn.cbs) == \
        sum(isinstance(cb, ChannelsLastBatches) for cb in learn.cbs) == 1
    learn.save('weights')
    assert (tmp_path / 'weights.pth').is_file()
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10) * 20, torch.randint(0, 10, (16,))
    assert torch.allclose(learn.loss_func(logits, y), F.cross_entropy(logits / 8, y, label_smoothing=0.1))
    with pytest.raises(ValueError) as e: cifar_learner(tiny_dls, precision='fp16')
    assert str(e.value) == "precision must be one of auto, fp32, bf16, got 'fp16'"


def test_fit_assignment_is_fastais_fit_one_cycle_on_the_assignments_schedule(learn, monkeypatch):
    calls = []
    monkeypatch.setattr(learn, 'fit_one_cycle', lambda *a, **kw: calls.append((a, kw)))
    cbs = [object()]
    fit_assignment(learn, 24, 0.01, 0.4, cbs=cbs, wd=0.)
    fit_assignment(learn, 2, 0.01, 0.4)
    assert calls == [((24,), dict(cbs=cbs, wd=0., **one_cycle_kwargs(0.01, 0.4))),
                     ((2,), dict(cbs=None, **one_cycle_kwargs(0.01, 0.4)))]


# ---- what the interpretation shows ------------------------------------------------------------------------------

def test_the_misclassified_shown_are_the_highest_loss_mistakes_highest_first():
    interp = SimpleNamespace(targs=torch.tensor([0, 0, 2, 2, 1, 3, 1]), decoded=torch.tensor([0, 1, 1, 2, 0, 3, 2]),
                             losses=torch.tensor([9., 1., 3., 8., 2., 7., 0.5]))
    # wrong: 1 (loss 1), 2 (3), 4 (2), 6 (0.5); right ones with higher losses are not mistakes
    assert top_misclassified(interp, 3).tolist() == [2, 4, 1]
    assert top_misclassified(interp, 10).tolist() == [2, 4, 1, 6]


def test_most_confused_are_the_largest_off_diagonal_counts_largest_first():
    cm = np.array([[50, 3, 9], [1, 40, 0], [7, 20, 30]])
    assert most_confused(cm, ['a', 'b', 'c'], k=3) == [('c', 'b', 20), ('a', 'c', 9), ('c', 'a', 7)]
    assert most_confused(cm, ['a', 'b', 'c'])[-1] == ('b', 'a', 1) and len(most_confused(cm, ['a', 'b', 'c'])) == 5
    full = np.arange(16).reshape(4, 4)  # 12 pairs off the diagonal: ten by default
    assert [n for _, _, n in most_confused(full, list('abcd'))] == [14, 13, 12, 11, 9, 8, 7, 6, 4, 3]


def test_denorm_inverts_the_normalization():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    img = denorm(normalized(x))
    assert img.shape == (2, 4, 5, 3) and np.allclose(img, x.permute(0, 2, 3, 1).numpy() / 255, atol=1e-6)
    # values outside the data's range (an adversarial or interpolated input) are clipped for display
    assert (denorm(torch.full((1, 3, 2, 2), 9.)) == 1).all() and (denorm(torch.full((1, 3, 2, 2), -9.)) == 0).all()


def test_interpret_keeps_fastais_predictions_and_confusion_matrix(learn, tmp_path):
    learn.remove_cb(learn.progress)
    interp = interpret(learn)
    preds, targs = learn.get_preds(dl=learn.dls.valid.new(shuffle=False, drop_last=False))
    assert torch.allclose(interp.preds, preds) and torch.equal(interp.targs, targs)
    assert torch.equal(interp.decoded, preds.argmax(1))
    cm = np.zeros((10, 10), int)
    for t, p in zip(targs.tolist(), preds.argmax(1).tolist()): cm[t, p] += 1  # rows true, columns predicted
    assert np.array_equal(interp.cm, cm) and cm.sum() == 20
    assert torch.allclose(interp.losses, F.cross_entropy(learn.get_preds(dl=learn.dls.valid, act=lambda x: x)[0] / 8,
                                                         targs, reduction='none'), atol=1e-5)
    idx = plot_misclassified(interp, tmp_path / 'm.png', k=4)
    assert idx.tolist() == top_misclassified(interp, 4).tolist() and (tmp_path / 'm.png').stat().st_size > 0
    plot_confusion(interp, tmp_path / 'c.png')
    assert (tmp_path / 'c.png').stat().st_size > 0


def test_interpret_reads_the_loader_it_is_given(learn):
    learn.remove_cb(learn.progress)
    dl = learn.dls.train.new(shuffle=False, drop_last=False)  # 60 training images, not the 20 test ones
    interp = interpret(learn, dl)
    assert interp.dl is dl and len(interp.targs) == len(interp.losses) == interp.cm.sum() == 60


# ---- docs/recipe.md's LR table ------------------------------------------------------------------------------------

CURVES = json.loads((Path(__file__).parent / 'data' / 'lr_find-curves-h100.json').read_text())
ROW = re.compile(r'^\| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| '
                 r'\*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| (\d+) \|$', re.M)


def docs_table():
    "docs/recipe.md's table of the rule on the five H100 curves: seed → (slide, minimum, valley, LRMIN, LRMAX, ratio)."
    return {int(m[0]): m[1:] for m in ROW.findall((ROOT / 'docs' / 'recipe.md').read_text())}


def test_the_docs_lr_table_is_what_the_rule_gives_on_the_h100_curves():
    table = docs_table()
    assert sorted(table) == [r['seed'] for r in CURVES['runs']] == [0, 1, 2, 3, 4]
    for run in CURVES['runs']:
        found = lrfind.from_curve(run['lrs'], run['losses'], CURVES['num_it'])
        s = found.suggestions
        want = [s['slide'], s['minimum'], s['valley'], found.lr_min, found.lr_max]
        # The page rounds to 3 significant digits (0.00120), the ratio to a whole number.
        assert [float(v) for v in table[run['seed']][:5]] == [float(f'{v:.3g}') for v in want]
        assert int(table[run['seed']][5]) == round(found.lr_max / found.lr_min)


# ---- what the finder reports ----------------------------------------------------------------------------------------

def test_the_rules_suggestions_mark_the_curve_where_fastai_plots_them():
    lrs, losses = hand_curve()
    losses[0] = 2.4  # a first point unlike the rest: a marker read off the wrong point shows
    c = lrfind.curve_rule(lrs, losses)
    for f, lr in ((lrfind.lrmin, c.lr_min), (lrfind.lrmax, c.lr_max)):
        got, (x, y) = f(lrs, losses, 71)
        i = int(np.abs(np.log10(lrs) - np.log10(lr)).argmin())  # the recorded LR nearest the suggestion
        assert got == x == pytest.approx(lr) and y == losses[i]
    # between two recorded LRs, the marker sits on the nearer one in log space
    assert lrfind._loss_at([1e-3, 1e-2], [5., 7.], 2.9e-3) == 5. \
        and lrfind._loss_at([1e-3, 1e-2], [5., 7.], 3.3e-3) == 7.


def test_the_finders_record_and_its_line():
    lrs, losses = hand_curve()
    losses = losses.tolist()
    losses[-1] = float('nan')  # the finder's last point can be NaN: JSON has no NaN
    found = lrfind.from_curve(lrs.tolist(), losses, 71, seconds=3.5)
    record = found.to_json()
    assert set(record) == {'suggestions', 'lr_min', 'lr_max', 'rule', 'seconds', 'num_it', 'plateau', 'threshold',
                           'fit', 'lrs', 'losses'}
    c = found.construction
    assert (record['lr_min'], record['lr_max'], record['rule']) == (c.lr_min, c.lr_max, c.rule)
    assert (record['plateau'], record['threshold'], record['fit']) == (c.plateau, c.threshold, list(c.fit))
    assert record['seconds'] == 3.5 and record['num_it'] == 71 and record['lrs'] == lrs.tolist()
    assert record['losses'][:-1] == losses[:-1] and record['losses'][-1] is None
    assert record['suggestions'] == found.suggestions and json.loads(json.dumps(record, allow_nan=False)) == record
    bare = lrfind.LRFind({'valley': float('nan')}, 1e-3, 1e-1, 'given').to_json()  # no construction: LRs given
    assert bare['suggestions'] == {'valley': None} and bare['plateau'] is None and bare['fit'] == []
    line = str(found)
    assert line == lrfind.describe(found.suggestions, found.lr_min, found.lr_max, found.rule)
    s = found.suggestions
    assert line == (f"minimum {s['minimum']:.3g}, steep {s['steep']:.3g}, valley {s['valley']:.3g}, "
                    f"slide {s['slide']:.3g}"
                    f' -> LRMIN {found.lr_min:.3g}, LRMAX {found.lr_max:.3g} ({found.rule})')
    assert lrfind.describe({'valley': 0.01234}) == 'valley 0.0123'


def test_the_finders_defaults_are_the_docs():
    # "fastai's lr_find (100 steps from 1e-7 to 10)": docs/recipe.md's words, which a full finder run is too slow
    # to test.
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(lrfind.find_lrs).parameters.items() if k != 'learn'}
    assert defaults == dict(num_it=100, start_lr=1e-7, end_lr=10)
    assert '(100 steps from 1e-7 to 10)' in (ROOT / 'docs' / 'recipe.md').read_text()


def test_a_suggestion_the_curve_is_too_short_for_is_nan():
    lrs, losses = hand_curve()
    out = lrfind.suggest(lrs[:20].tolist(), losses[:20].tolist(), 20)  # 13 points once trimmed: `slide` needs 16
    assert np.isnan(out['slide']) and all(np.isfinite(out[k]) for k in ('minimum', 'steep', 'valley'))
    assert 'slide nan' in lrfind.describe(out)
