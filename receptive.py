"""The theoretical receptive field of every layer, derived from the modules as a forward pass runs them."""
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ['receptive_field', 'block_fields', 'rf_table', 'covers']

# Layers that look at a window of their input; everything else that keeps the map's size (BN, ReLU, Dropout)
# leaves the field as it is. Adaptive pools are windows too, when their output size divides the input's.
WINDOWS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Field:
    "The field of a map along one axis: side `rf` and spacing `jump` in input pixels, `start` the first unit's centre."
    rf: float = 1
    jump: float = 1
    start: float = 0  # in input pixel indices: pixel i has its centre at i; negative is in the padding

    @property
    def lo(self): return self.start - (self.rf - 1) / 2
    @property
    def hi(self): return self.start + (self.rf - 1) / 2

    def window(self, k, s, p, d):
        "The field after a k×k window of stride s, padding p and dilation d (the receptive-field arithmetic)."
        span = d * (k - 1)  # the window's reach, in input units: a dilated window skips d-1 units between taps
        return Field(self.rf + span * self.jump, self.jump * s, self.start + (span / 2 - p) * self.jump)

    def whole(self, n):
        "The field of one unit that sees all `n` units of this map (a flatten, a global pool, a Linear)."
        hi = self.hi + (n - 1) * self.jump
        return Field(hi - self.lo + 1, self.jump * n, (self.lo + hi) / 2)


def _union(fields):
    "The field of a sum (a residual add) or any other op on several maps: it reaches as far as each of them."
    lo, hi = min(f.lo for f in fields), max(f.hi for f in fields)
    return Field(hi - lo + 1, max(f.jump for f in fields), (lo + hi) / 2)


def _window_args(m, n_in, n_out):
    "(kernel, stride, padding, dilation) per axis of a window layer whose input is n_in and output n_out units."
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        if any(i % o for i, o in zip(n_in, n_out)):
            raise ValueError(f'{type(m).__name__} from {tuple(n_in)} to {tuple(n_out)}: its windows differ in size')
        k = [i // o for i, o in zip(n_in, n_out)]
        return k, k, (0, 0), (1, 1)
    k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(getattr(m, 'dilation', 1))
    p = m.padding
    if p == 'valid': p = 0
    if p == 'same': p = [di * (ki - 1) // 2 for ki, di in zip(k, d)]  # PyTorch pads the odd pixel at the far end
    return k, s, _pair(p), d


class _Fields(TorchFunctionMode):
    "Carries each tensor's fields (one per spatial axis) through every torch op, so adds and flattens are seen too."
    # A module hook alone misses `x + self.res(x)` and `.flatten(1)`, which are no modules; a TorchFunctionMode sees
    # every op on tensors. The fields ride on the tensors themselves, so any network's wiring is followed.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in _tensors((args, kwargs)) if hasattr(t, '_fields')]
        if ins and isinstance(out, torch.Tensor):
            big = max(ins, key=lambda t: t.dim())
            if any(t._fields is None for t in ins): out._fields = None
            # An op that drops the spatial axes (flatten, mean over H and W) hands every unit the whole map.
            elif out.dim() < big.dim():
                out._fields = [_union([t._fields[a] for t in ins]).whole(n) for a, n in enumerate(big.shape[-2:])]
            # One that resizes the map is a window layer's own op (its hook then sets the field), or unknown.
            elif big.dim() == 4 and out.shape[-2:] != big.shape[-2:]: out._fields = None
            else: out._fields = [_union([t._fields[a] for t in ins]) for a in range(2)]
        return out


def _tensors(tree):
    "Every tensor in nested args and kwargs."
    if isinstance(tree, torch.Tensor): yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree: yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values(): yield from _tensors(t)


def receptive_field(model, input_size=(3, 32, 32)):
    "Per leaf layer in forward order (named as `arch.model_summary` names it): its theoretical receptive field."
    return _trace(model, input_size)[0]


def block_fields(model, names, input_size=(3, 32, 32)):
    "The theoretical field of the output of each named submodule (a block ending in a residual add, say)."
    return _trace(model, input_size, names)[1]


def _trace(model, input_size, names=()):
    "One forward pass of zeros that carries the fields: a row per leaf layer, and a row per named module's output."
    rows, named = [], {}
    def hook(m, inp, out):
        x = next(t for t in _tensors(inp) if hasattr(t, '_fields'))
        if x._fields is None: raise ValueError(f'an op that is not a module resized the map before {type(m).__name__}; '
                                               'its receptive field is not known here')
        if isinstance(m, WINDOWS):
            n_in, n_out = x.shape[-2:], out.shape[-2:]
            fields = [f.window(*a) for f, *a in zip(x._fields, *_window_args(m, n_in, n_out))]
        elif out.dim() == 4 and out.shape[-2:] != x.shape[-2:]:
            raise ValueError(f'{type(m).__name__} changes the map from {tuple(x.shape[-2:])} to '
                             f'{tuple(out.shape[-2:])}, and its receptive field is not known here')
        elif out.dim() < 4 and x.dim() == 4:  # a layer that reads the whole map at once
            fields = [f.whole(n) for f, n in zip(x._fields, x.shape[-2:])]
        else: fields = x._fields  # BN, ReLU, Dropout, a Linear after a flatten: the field is unchanged
        out._fields = fields
        size = list(out.shape[-2:]) if out.dim() == 4 else [1, 1]
        rows.append(dict(layer=f'{type(m).__name__}-{len(rows) + 1}', **_row(fields, size)))
    def keep(name):  # runs after the leaves inside the module, and after its own ops (an add) have set the field
        return lambda m, inp, out: named.__setitem__(name, dict(layer=name, **_row(out._fields, out.shape[-2:])))
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    hooks += [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
        x._fields = [Field(), Field()]
        with torch.no_grad(), _Fields(): model(x)
    finally:
        for h in hooks: h.remove()
        model.train(was_training)
    return rows, named


def _row(fields, size):
    "A table row's numbers: one value for a square field, an (H, W) pair otherwise."
    one = lambda a, b: _num(a) if a == b else (_num(a), _num(b))
    (h, w), (sh, sw) = fields, size
    return dict(rf=one(h.rf, w.rf), jump=one(h.jump, w.jump), size=one(sh, sw), start=one(h.start, w.start))


def _num(v): return int(v) if float(v).is_integer() else v


def covers(rows, input_size=(3, 32, 32)):
    "The first rows whose field is as wide as the input, where one unit sees every pixel, and where every unit does."
    def spans(r, units):  # do these units' fields reach from pixel 0 to the last pixel, on both axes?
        return all(any(st + i * j - (f - 1) / 2 <= 0 and st + i * j + (f - 1) / 2 >= n - 1 for i in units(k))
                   for f, j, k, st, n in zip(*(_pair(r[c]) for c in ('rf', 'jump', 'size', 'start')), input_size[-2:]))
    wide = next((r for r in rows if all(f >= n for f, n in zip(_pair(r['rf']), input_size[-2:]))), None)
    one = next((r for r in rows if spans(r, range)), None)
    every = next((r for r in rows if spans(r, lambda k: [0]) and spans(r, lambda k: [k - 1])), None)
    return wide, one, every


def _name(row): return row['layer'] if row else 'no layer'


def rf_table(rows, input_size=(3, 32, 32)):
    "The receptive fields as a table in the model summary's style, saying where the field first covers the image."
    wide, one, every = covers(rows, input_size)
    bar, dbl = '-' * 64, '=' * 64
    lines = [bar, f"{'Layer (type)':>20}  {'Output size':>12} {'Jump':>6} {'RF':>6} {'Start':>12}", dbl]
    lines += [f"{r['layer']:>20}  {str(r['size']):>12} {str(r['jump']):>6} {str(r['rf']):>6} {str(r['start']):>12}"
              for r in rows]
    lines += [dbl, 'RF: the side of the theoretical receptive field in input pixels, not clipped to the image.',
              'Jump: input pixels between neighbouring output units. Start: centre of the first',
              "unit's field, in input pixel indices (negative: in the zero padding).",
              f"The field is as wide as the {input_size[-2]}×{input_size[-1]} input from {_name(wide)}; "
              f"it first covers the whole input at {_name(one)}", f"(one unit sees every pixel), and every unit's "
              f"field does from {_name(every)}.", bar]
    return '\n'.join(lines)
