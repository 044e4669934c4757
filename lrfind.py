"""fastai's `lr_find`, run so that the learner is untouched, and the rule that turns its curve into LRMIN and LRMAX."""
import tempfile, time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.callback.schedule import minimum, slide, steep, valley

from cli import RunError
from rng import rng_state, set_rng_state

__all__ = ['FIT_DECADES', 'DESCENT', 'RATIO', 'CurveRule', 'curve_rule', 'lrmin', 'lrmax', 'trim', 'suggest',
           'LRFind', 'FinderError', 'find_lrs', 'from_curve', 'describe']

# The rule's three settings, each chosen on the five real H100 curves in tests/data/lr_find-curves-h100.json.
FIT_DECADES = 0.5   # half-width, in decades of LR, of the window around the lowest loss where a parabola is fitted
DESCENT = 0.05      # LRMIN is the last LR before the minimum still within this fraction of the drop from the plateau
RATIO = (100, 1000)  # LRMAX/LRMIN kept in this range: 100 and 1,000 trained equally well on a GPU, 10 worse (issue 12)


@dataclass(frozen=True)
class CurveRule:
    "LRMIN and LRMAX read off a finder curve, and the construction behind them, for the record and the plot."
    lr_min: float
    lr_max: float
    rule: str          # how each was read, in words
    plateau: float     # the loss before the descent: the median of the curve's first quarter
    threshold: float   # plateau − DESCENT × (plateau − lowest loss): LRMIN is the last LR above it
    fit: tuple = ()    # (lo, hi, a, b, c): loss ≈ a·t² + b·t + c, t = log10(LR), fitted over LR in [lo, hi]


def curve_rule(lrs, losses):
    "LRMAX at the curve's bottom (a parabola's vertex), LRMIN where the descent begins, from a trimmed finder curve."
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if len(lrs) < 2: raise FinderError(f'the finder curve has {len(lrs)} usable point(s); it needs at least 2')
    t, i = np.log10(lrs), int(losses.argmin())
    # LRMAX: the lowest smoothed loss sits on a flat, noisy floor (seeds put the single lowest point anywhere from
    # 0.21 to 0.53 on a GPU), so a parabola through the half decade either side finds the floor's middle.
    near = np.abs(t - t[i]) <= FIT_DECADES
    a, b, c = np.polyfit(t[near], losses[near], 2) if near.sum() >= 3 else (0., 0., 0.)
    vertex = -b / (2 * a) if a > 0 else None
    if vertex is not None and t[near].min() <= vertex <= t[near].max():
        lr_max, why_max, fit = 10 ** vertex, 'vertex of a parabola fitted around the lowest loss', (
            float(lrs[near].min()), float(lrs[near].max()), float(a), float(b), float(c))
    else: lr_max, why_max, fit = lrs[i], 'the lowest loss (too few points or no bowl to fit)', ()
    # LRMIN: where the loss starts its descent, the last LR before the minimum that has lost no more than
    # DESCENT of the total drop. Read backwards from the minimum, so an early noisy dip is not taken for it.
    plateau = float(np.median(losses[:max(1, len(losses) // 4)]))
    threshold = plateau - DESCENT * (plateau - losses[i])
    above = np.flatnonzero(losses[:i] >= threshold)
    lo, hi = lr_max / RATIO[1], lr_max / RATIO[0]
    if not len(above): lr_min, why_min = hi, f'LRMAX/{RATIO[0]} (no descent before the lowest loss)'
    elif lrs[above[-1]] > hi: lr_min, why_min = hi, f'LRMAX/{RATIO[0]} (the descent began above it)'
    elif lrs[above[-1]] < lo: lr_min, why_min = lo, f'LRMAX/{RATIO[1]} (the descent began below it)'
    else: lr_min, why_min = lrs[above[-1]], f'start of the descent ({DESCENT:.0%} of the drop)'
    return CurveRule(float(lr_min), float(lr_max), f'LRMIN = {why_min}; LRMAX = {why_max}', plateau, float(threshold),
                     fit)


def _loss_at(lrs, losses, lr):
    "The curve's loss at the recorded LR nearest `lr` (in log space): where fastai's plot puts a marker."
    return float(losses[int(np.abs(np.log(np.asarray(lrs, dtype=float)) - np.log(lr)).argmin())])


# The rule as two fastai suggestion functions: `learn.lr_find(suggest_funcs=(lrmin, lrmax))` returns
# SuggestedLRs(lrmin=…, lrmax=…) and marks both on fastai's own plot.
def lrmin(lrs, losses, num_it):
    "LRMIN by `curve_rule`, as a fastai `lr_find` suggestion: (LR, (LR, loss there))."
    lr = curve_rule(lrs, losses).lr_min
    return lr, (lr, _loss_at(lrs, losses, lr))


def lrmax(lrs, losses, num_it):
    "LRMAX by `curve_rule`, as a fastai `lr_find` suggestion: (LR, (LR, loss there))."
    lr = curve_rule(lrs, losses).lr_max
    return lr, (lr, _loss_at(lrs, losses, lr))


def trim(lrs, losses, num_it):
    "The part of a finder curve that fastai's suggestions read: without the first tenth, the last 5 points and any NaN."
    lrs, losses = torch.tensor(lrs[num_it // 10:-5]), torch.tensor(losses[num_it // 10:-5])
    bad = (~torch.isfinite(losses)).nonzero()
    return (lrs[:bad[0, 0]], losses[:bad[0, 0]]) if len(bad) else (lrs, losses)


SUGGESTIONS = {f.__name__: f for f in (minimum, steep, valley, slide)}  # fastai's four, by name


def suggest(lrs, losses, num_it):
    "fastai's four suggestions for a finder curve, each NaN where the curve is too short or too flat for it."
    # We call them ourselves because lr_find fails outright when one does: `slide` needs 16 points.
    lrs, losses = trim(lrs, losses, num_it)
    out = {}
    for name, f in SUGGESTIONS.items():
        try: out[name] = float(f(lrs, losses, num_it)[0])
        except (IndexError, ValueError, RuntimeError): out[name] = float('nan')
    return out


@dataclass
class LRFind:
    "What `find_lrs` found: the chosen LRMIN and LRMAX, the rule's construction, fastai's four suggestions, the curve."
    suggestions: dict
    lr_min: float
    lr_max: float
    rule: str
    lrs: list = field(repr=False, default_factory=list)
    losses: list = field(repr=False, default_factory=list)
    num_it: int = 100
    seconds: float = 0.
    construction: CurveRule = None

    def __str__(self): return describe(self.suggestions, self.lr_min, self.lr_max, self.rule)

    def to_json(self):
        "Everything, the whole curve included, so that any run's choice can be checked again later (NaN → null)."
        ok = lambda v: v if v == v else None
        c = self.construction
        return dict(suggestions={k: ok(v) for k, v in self.suggestions.items()}, lr_min=self.lr_min,
                    lr_max=self.lr_max, rule=self.rule, seconds=self.seconds, num_it=self.num_it,
                    plateau=c and c.plateau, threshold=c and c.threshold, fit=list(c.fit) if c else [],
                    lrs=self.lrs, losses=[ok(v) for v in self.losses])


class FinderError(RunError):
    "The finder's curve was too short or too flat to choose LRMIN and LRMAX: the run fails (exit 1); no flag was wrong."


def find_lrs(learn, num_it=100, start_lr=1e-7, end_lr=10):
    "Run fastai's `lr_find`, read LRMIN and LRMAX off its curve with `curve_rule`, and leave `learn` as it was before."
    # fastai restores the weights itself, but not the optimizer's absence, the recorder or the random
    # streams, and its optimizer state has leaked into later fits before (fastai #3013, #2892).
    weights = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    rng, opt, path = rng_state(learn), learn.opt, learn.path
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:  # lr_find saves a snapshot under learn.path
            learn.path = Path(tmp)
            learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it, show_plot=False, suggest_funcs=None)
        lrs, losses = [float(v) for v in learn.recorder.lrs], [float(v) for v in learn.recorder.losses]
    finally:
        learn.path, learn.opt = path, opt
        learn.model.load_state_dict(weights)
        set_rng_state(learn, rng)
        learn.recorder.lrs, learn.recorder.losses, learn.recorder.values, learn.recorder.iters = [], [], [], []
    return from_curve(lrs, losses, num_it, time.perf_counter() - start)


def from_curve(lrs, losses, num_it, seconds=0.):
    "The `LRFind` of a recorded finder curve (this run's, or one saved in lr_find.json): the rule and fastai's four."
    try: c = curve_rule(*trim(lrs, losses, num_it))
    except FinderError as e:
        raise FinderError(f'lr_find could not choose LRs: {e}; pass --lr-min and --lr-max, or give the finder more '
                          'steps (--find-iters) or more data (--subset)') from None
    return LRFind(suggest(lrs, losses, num_it), c.lr_min, c.lr_max, c.rule, list(lrs), list(losses), num_it, seconds, c)


def describe(sugg, lr_min=None, lr_max=None, rule=None):
    "One line for the console: fastai's suggestions and, when given, the chosen LRMIN and LRMAX and why."
    line = ', '.join(f'{k} {v:.3g}' for k, v in sugg.items())
    return line + (f' -> LRMIN {lr_min:.3g}, LRMAX {lr_max:.3g} ({rule})' if lr_max is not None else '')
