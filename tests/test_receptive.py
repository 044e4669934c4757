"""Theoretical receptive fields, checked by brute force: the pixels a unit's gradient reaches span exactly its field."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch import _leaf_rows, custom_resnet, receptive_field, write_summary
from receptive import covers, rf_table


def no_lost_gradient(model):
    "A `model` copy whose every input pixel in a field gets a gradient: pools average, weights are positive, BN scales."
    # BN in eval mode, with fresh statistics: a positive affine map, nothing cancels
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        new = None
        if isinstance(m, nn.MaxPool2d):  # a max routes its gradient to one pixel of the window; an average to all
            assert m.dilation in (1, (1, 1))
            new = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode)
        if isinstance(m, nn.AdaptiveMaxPool2d): new = nn.AdaptiveAvgPool2d(m.output_size)
        if isinstance(m, nn.BatchNorm2d): m.reset_running_stats()
        if new is not None:
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, new)
    with torch.no_grad():
        for p in model.parameters(): p.abs_().add_(1e-3)  # positive activations everywhere: every ReLU passes
    return model


def spans(model, input_size):
    "Per leaf layer: the rows and columns of input pixels on which its middle output unit depends."
    model, outs = no_lost_gradient(model), []
    def hook(m, inp, out):
        outs.append(out := out.clone())  # the rest of the network gets a copy: its in-place ReLUs leave ours alone
        return out
    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    x = torch.rand(1, *input_size).add_(0.5).requires_grad_()
    try: model(x)
    finally:
        for h in hooks: h.remove()
    result = []
    for out in outs:
        unit = out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum() if out.dim() == 4 else out[0].sum()
        (g,) = torch.autograd.grad(unit, x, retain_graph=True)
        hit = g[0].abs().sum(0) > 0
        rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
        result.append(((rows.min().item(), rows.max().item()), (cols.min().item(), cols.max().item())))
    return result


def field_of_middle_unit(row, input_size):
    "The input pixels, per axis, that `row`'s field gives the middle output unit: (first, last)."
    pair = lambda v: v if isinstance(v, tuple) else (v, v)
    ends = []
    for rf, jump, size, start in zip(*(pair(row[k]) for k in ('rf', 'jump', 'size', 'start'))):
        centre = start + (size // 2) * jump
        lo, hi = centre - (rf - 1) / 2, centre + (rf - 1) / 2
        assert lo == int(lo) and hi == int(hi)  # a field's ends are pixels
        ends.append((int(lo), int(hi)))
    return tuple(ends)


def check(model, rows, input_size):
    "The brute-force spans equal the computed fields, which the input holds; a flattened head's unit sees it all."
    found = spans(model, input_size)
    assert len(found) == len(rows)
    whole = tuple((0, n - 1) for n in input_size[-2:])
    for row, got in zip(rows, found):
        field = field_of_middle_unit(row, input_size)
        inside = all(0 <= lo and hi <= n - 1 for (lo, hi), n in zip(field, input_size[-2:]))
        if row['size'] == 1 and not inside:
            # One unit that reads the whole map (after a flatten or a global pool): its field covers the image, and
            # it depends on every pixel. A field that only reaches past the image through padding says no more.
            assert got == whole and all(lo <= 0 and hi >= n - 1 for (lo, hi), n in zip(field, input_size[-2:]))
        else:
            assert inside, f"{row['layer']}: the input is too small to hold the middle unit's whole field"
            assert got == field, row
    return found


def test_custom_resnet_every_layer_by_brute_force():
    model = custom_resnet()
    rows = receptive_field(model)
    assert [r['layer'] for r in rows] == [r[0] for r in _leaf_rows(model, (3, 32, 32))]  # the summary's names
    # On 96×96 the middle unit's field fits inside the image at every layer up to the head's pool (RF 88). The
    # head's Linear needs 32×32 input, so the large input goes through all but it: the same fields, bigger maps.
    body = nn.Sequential(*list(model.children())[:-1], model.head.pool)
    big = receptive_field(body, (3, 96, 96))
    assert [{**r, 'size': 0} for r in big] == [{**r, 'size': 0} for r in rows[:28]]
    check(body, big, (3, 96, 96))
    # The Linear on 32×32 input: its one unit's field covers the image, and it depends on every pixel.
    assert field_of_middle_unit(rows[-1], (3, 32, 32)) == ((-28, 59), (-28, 59))
    assert spans(model, (3, 32, 32))[-1] == ((0, 31), (0, 31))
    assert [r['rf'] for r in rows if r['layer'].startswith(('Conv2d', 'MaxPool2d'))] == [
        3, 5, 6, 10, 14, 18, 20, 28, 32, 48, 64, 88]


def test_strides_paddings_dilations_and_pools_by_brute_force():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 5, stride=2, padding=1), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 4, 3, dilation=2), nn.BatchNorm2d(4),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 3, 3, stride=3, padding=2, dilation=3),
        nn.Conv2d(3, 3, (3, 5), padding='same'))
    size = (2, 222, 222)
    rows = receptive_field(net, size)
    check(net, rows, size)
    # A 3×5 kernel: the field is wider than tall, and the table gives (H, W) pairs where the axes differ.
    assert (rows[-1]['rf'], rows[-1]['jump'], rows[-1]['start']) == ((125, 173), 24, 19)


class Down(nn.Module):
    "A strided residual block: a 4×4 stride-2 path plus a 1×1 stride-2 shortcut, whose fields are centred apart."
    def __init__(self, c):
        super().__init__()
        self.path = nn.Sequential(nn.Conv2d(c, c, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=2, dilation=2))
        self.short = nn.Conv2d(c, c, 1, stride=2)

    def forward(self, x): return self.path(x) + self.short(x)


def test_residual_adds_and_a_global_pool_by_brute_force():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Down(4), nn.MaxPool2d(2), Down(4),
                        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    size = (3, 96, 96)
    rows = receptive_field(net, size)
    found = check(net, rows, size)
    # The add takes the 4×4 path's wider field (14, centred half a pixel off), not the 1×1 shortcut's (3).
    assert [(r['layer'], r['rf'], r['start']) for r in rows[3:6]] == [
        ('Conv2d-4', 14, 0.5), ('Conv2d-5', 3, 0), ('MaxPool2d-6', 16, 1.5)]
    assert found[-1] == ((0, 95), (0, 95))  # after the global pool, one unit sees every pixel


def test_a_resize_outside_any_module_is_refused():
    class Up(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(1, 1, 3)
        def forward(self, x): return self.conv(F.interpolate(x, scale_factor=2))
    with pytest.raises(ValueError, match='not a module resized the map before Conv2d'):
        receptive_field(Up(), (1, 8, 8))


def test_table_says_where_the_field_covers_the_image(tmp_path):
    rows = receptive_field(custom_resnet())
    wide, one, every = covers(rows)
    assert (wide['layer'], one['layer'], every['layer']) == ('MaxPool2d-19', 'Conv2d-22', 'Conv2d-25')
    f = write_summary(custom_resnet(), tmp_path)
    text = f.read_text()
    assert rf_table(rows) in text and text.index('Estimated Total Size') < text.index('Jump')
    assert 'it first covers the whole input at Conv2d-22' in text
    assert '    MaxPool2d-28             1     32     88         15.5' in text


def test_ops_after_the_flatten_keep_the_whole_field():
    class Head(nn.Module):  # a functional Linear outside any module, then a leaf layer after it
        def __init__(self): super().__init__(); self.w, self.act = nn.Parameter(torch.ones(3, 8)), nn.ReLU()
        def forward(self, x): return self.act(F.linear(x.flatten(1), self.w))
    rows = receptive_field(nn.Sequential(nn.Conv2d(2, 2, 3), Head()), (2, 4, 4))
    assert [(r['layer'], r['rf'], r['start']) for r in rows] == [('Conv2d-1', 3, 1), ('ReLU-2', 4, 1.5)]
