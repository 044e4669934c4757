"""The assignment's custom ResNet ("ResNet-9") for CIFAR-10, and its model summary table."""
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from receptive import receptive_field, rf_table

__all__ = ['conv_bn', 'Residual', 'Head', 'custom_resnet', 'model_summary', 'write_summary', 'receptive_field',
           'BLOCKS']

BLOCKS = ('prep', 'layer1', 'layer2', 'layer3')  # the named feature blocks, input to output


def conv_bn(c_in, c_out, pool=False):
    "Conv 3×3 (stride 1, pad 1, no bias) → [MaxPool 2] → BN → ReLU: the network's one building block."
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool: layers.append(nn.MaxPool2d(2))
    # In-place ReLU saves activation memory; Grad-CAM (cams.py) hooks tensors, not modules, so it copes.
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    "The assignment's ResBlock: x + (Conv-BN-ReLU-Conv-BN-ReLU)(x)."
    def __init__(self, c):
        super().__init__()
        self.res = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x): return x + self.res(x)


class Head(nn.Module):
    "MaxPool(4) → FC(512→10, no bias); logits out, since the SoftMax lives in the loss."
    def __init__(self, c_in=512, n_out=10):
        super().__init__()
        self.pool, self.fc = nn.MaxPool2d(4), nn.Linear(c_in, n_out, bias=False)

    # Flattening inside forward (not an nn.Flatten) keeps the summary at the assignment's 29 rows.
    def forward(self, x): return self.fc(self.pool(x).flatten(1))


def custom_resnet(n_out=10):
    "The assignment's network as an `nn.Sequential` of named blocks: prep, layer1, layer2, layer3, head."
    return nn.Sequential(OrderedDict(
        prep=conv_bn(3, 64),
        layer1=nn.Sequential(OrderedDict(conv=conv_bn(64, 128, pool=True), res=Residual(128))),
        layer2=conv_bn(128, 256, pool=True),
        layer3=nn.Sequential(OrderedDict(conv=conv_bn(256, 512, pool=True), res=Residual(512))),
        head=Head(512, n_out),
    ))


def _leaf_rows(model, input_size):
    "(name, output shape, parameter count) for each leaf module, in the order the forward pass runs them."
    rows, hooks = [], []
    def hook(m, inp, out): rows.append((type(m).__name__, [-1, *out.shape[1:]], m))
    for m in model.modules():
        if not list(m.children()): hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad(): model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks: h.remove()
        model.train(was_training)
    return [(f'{name}-{i}', shape, sum(q.numel() for q in m.parameters(recurse=False)),
             sum(q.numel() for q in m.parameters(recurse=False) if q.requires_grad))
            for i, (name, shape, m) in enumerate(rows, 1)]


def model_summary(model, input_size=(3, 32, 32)):
    "The torchsummary-style table of the assignment: one row per leaf layer, then totals and sizes in MB."
    rows = _leaf_rows(model, input_size)
    total, trainable = sum(r[2] for r in rows), sum(r[3] for r in rows)
    mb = 4 / 1024 ** 2  # bytes of a float32, in MB
    n_out = sum(torch.Size(s[1:]).numel() for _, s, _, _ in rows)
    in_mb, out_mb, par_mb = torch.Size(input_size).numel() * mb, 2 * n_out * mb, total * mb  # ×2: grads
    bar, dbl = '-' * 64, '=' * 64
    lines = [bar, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", dbl]
    lines += [f'{name:>20}  {str(shape):>25} {n:>15,}' for name, shape, n, _ in rows]
    lines += [dbl, f'Total params: {total:,}', f'Trainable params: {trainable:,}',
              f'Non-trainable params: {total - trainable:,}', bar,
              f'Input size (MB): {in_mb:0.2f}', f'Forward/backward pass size (MB): {out_mb:0.2f}',
              f'Params size (MB): {par_mb:0.2f}', f'Estimated Total Size (MB): {in_mb + out_mb + par_mb:0.2f}', bar]
    return '\n'.join(lines)


def write_summary(model, path, input_size=(3, 32, 32)):
    "Write `model_summary`, then the receptive-field table, to `path` (a file, or a folder that gets `summary.txt`)."
    path = Path(path)
    if path.is_dir(): path = path / 'summary.txt'
    # The assignment's table first and untouched; the fields are a second table after a blank line.
    path.write_text(model_summary(model, input_size) + '\n\n'
                    + rf_table(receptive_field(model, input_size), input_size) + '\n')
    return path
