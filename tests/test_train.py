"""The one-cycle schedule starts, peaks and ends where the assignment says; the finder leaves the learner clean."""
import numpy as np
import pytest
import torch
from fastai.callback.schedule import combined_cos
from fastai.torch_core import set_seed

from conftest import make_folder
from data import cifar_dls
from report import read_csv
from callbacks import RunLog
from train import PEAK, choose_lrs, cifar_learner, find_lrs, fit_assignment, one_cycle_kwargs

LR_MIN, LR_MAX = 0.01, 0.4


@pytest.fixture
def micro(tmp_path):
    "One train and one test image a class: two batches of 5 an epoch, so 24 epochs take seconds."
    return make_folder(tmp_path / 'micro', n_train=1, n_test=1)


def learner(folder, bs, seed=0):
    set_seed(seed, reproducible=True)
    learn = cifar_learner(cifar_dls(folder, bs=bs, device='cpu', seed=seed, verbose=False))
    learn.remove_cb(learn.progress)
    return learn


def test_one_cycle_kwargs_give_the_assignment_curve():
    kw = one_cycle_kwargs(LR_MIN, LR_MAX)
    sched = combined_cos(kw['pct_start'], kw['lr_max'] / kw['div'], kw['lr_max'], kw['lr_max'] / kw['div_final'])
    assert sched(0.) == pytest.approx(LR_MIN) and sched(PEAK) == pytest.approx(LR_MAX)
    assert sched(1.) == pytest.approx(LR_MIN)
    assert min(sched(p) for p in np.linspace(0, 1, 1001)) >= LR_MIN * (1 - 1e-9)
    assert PEAK * 24 == 5


def test_24_epoch_fit_starts_at_lrmin_peaks_at_epoch_5_and_ends_at_lrmin(micro, tmp_path):
    learn = learner(micro, bs=5)
    with learn.no_logging(): fit_assignment(learn, 24, LR_MIN, LR_MAX, cbs=RunLog(tmp_path))
    lrs = np.array(learn.recorder.lrs)
    assert len(lrs) == 48
    assert lrs[0] == pytest.approx(LR_MIN)
    assert lrs.argmax() == 10 and lrs[10] == pytest.approx(LR_MAX)  # step 10 of 48: the end of epoch 5
    # fastai sets the LR before each step, so the last of 48 steps sits at 47/48 of the curve, just above LRMIN.
    assert lrs.min() >= LR_MIN and lrs[-1] == pytest.approx(LR_MIN, rel=0.1) and (np.diff(lrs[10:]) < 0).all()
    sched = read_csv(tmp_path / 'schedule.csv')
    assert [r['lr'] for r in sched] == pytest.approx(lrs.tolist()) and sched[10]['epoch'] == 5
    metrics = read_csv(tmp_path / 'metrics.csv')
    assert [r['epoch'] for r in metrics] == list(range(1, 25))
    assert metrics[0]['lr'] == pytest.approx(LR_MIN) and metrics[5]['lr'] == pytest.approx(LR_MAX)


def test_finder_leaves_weights_optimizer_recorder_and_rng_as_they_were(micro):
    learn = learner(micro, bs=5)
    weights = {k: v.clone() for k, v in learn.model.state_dict().items()}
    rng, dl_rng = torch.get_rng_state(), learn.dls.train.rng.getstate()
    found = find_lrs(learn, num_it=12)
    assert set(found.suggestions) == {'minimum', 'steep', 'valley', 'slide'}
    assert 0 < found.lr_min < found.lr_max and len(found.lrs) == len(found.losses) > 0
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in weights.items())
    assert learn.opt is None  # the real fit builds a fresh optimizer
    assert learn.recorder.lrs == [] and learn.recorder.losses == [] and learn.recorder.values == []
    assert torch.equal(torch.get_rng_state(), rng) and learn.dls.train.rng.getstate() == dl_rng


def test_training_after_the_finder_equals_training_without_it(micro):
    runs = []
    for finder in (True, False):
        learn = learner(micro, bs=5)
        if finder: find_lrs(learn, num_it=12)
        with learn.no_logging(): fit_assignment(learn, 2, LR_MIN, LR_MAX)
        runs.append((learn.model.state_dict(), learn.recorder.values))
    (w1, v1), (w2, v2) = runs
    assert v1 == v2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


NAN = float('nan')


@pytest.mark.parametrize('sugg,expected', [
    # the full-data finder at batch 512 (results/lr_find): slide and valley
    (dict(minimum=0.0525, steep=0.0832, valley=0.0063, slide=0.209), (0.0063, 0.209)),
    # a curve too short for slide: minimum stands in
    (dict(minimum=0.02, steep=0.05, valley=0.003, slide=NAN), (0.003, 0.02)),
    # a noisy curve where slide lands below the descent: minimum again
    (dict(minimum=0.025, steep=0.14, valley=0.001, slide=1.2e-6), (0.001, 0.025)),
    # valley not below LRMAX: fastai's default div of 25
    (dict(minimum=0.01, steep=0.05, valley=0.3, slide=NAN), (0.01 / 25, 0.01)),
])
def test_the_lr_rule(sugg, expected):
    lr_min, lr_max, why = choose_lrs(sugg)
    assert (lr_min, lr_max) == pytest.approx(expected) and lr_min < lr_max and why
