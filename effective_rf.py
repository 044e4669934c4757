"""The effective receptive field (Luo et al., NeurIPS 2016): how much of its theoretical field a block's unit uses."""
import json, time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from arch import BLOCKS, custom_resnet, receptive_field
from receptive import block_fields, rf_table
from report import marked, save_figure

__all__ = ['test_images', 'central_gradients', 'mass_radius', 'measure', 'plot_effective_rf', 'rf_section',
           'receptive_fields']

START = '<!-- receptive_field -->'  # report.md's section (`report.marked`), replaced on a redraw


def test_images(dl, n=256):
    "The first `n` images of a (test) DataLoader as one plain tensor, normalized as the network sees them."
    xs, have = [], 0
    for xb, *_ in dl:
        xs.append(xb.as_subclass(torch.Tensor)[:n - have])  # fastai's TensorImage dispatch adds nothing here
        have += len(xs[-1])
        if have >= n: break
    return torch.cat(xs)


def central_gradients(model, images, blocks=BLOCKS, bs=64):
    "Per block: the mean over `images` of |∂(central unit, summed over channels)/∂input|, summed over RGB (H×W, CPU)."
    # Luo et al.'s measurement. The blocks run one after another, so one forward pass serves them all, and a
    # batch's sum is differentiated at once: in eval mode every image's unit depends on that image alone.
    dev, total = next(model.parameters()).device, {b: 0. for b in blocks}
    was_training = model.training
    try:
        model.eval()
        for x in images.split(bs):
            x = x.to(dev).requires_grad_()
            h, outs = x, []
            with torch.enable_grad():
                for b in blocks:
                    h = model.get_submodule(b)(h)
                    outs.append(h)
                for b, out in zip(blocks, outs):
                    unit = out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum()
                    (g,) = torch.autograd.grad(unit, x, retain_graph=True)
                    total[b] = total[b] + g.abs().sum((0, 1)).double().cpu()
    finally: model.train(was_training)
    return {b: (t / len(images)).numpy() for b, t in total.items()}


def mass_radius(grad, centre, share):
    "The smallest r such that the pixels within r of `centre` (a square: max(|dy|, |dx|) ≤ r) hold `share` of the mass."
    ys, xs = np.indices(grad.shape)
    d = np.maximum(abs(ys - centre[0]), abs(xs - centre[1])).ravel()
    order = np.argsort(d, kind='stable')
    mass = np.cumsum(grad.ravel()[order])
    return float(d[order][np.searchsorted(mass, share * mass[-1])])


def measure(trained, init, images, init_note, blocks=BLOCKS):
    "The effective fields of `trained` and `init` beside the theoretical ones: a JSON-able dict, and the gradient maps."
    t, cpu = time.perf_counter(), time.process_time()
    theory = block_fields(trained, blocks, tuple(images.shape[1:]))
    maps = {'init': central_gradients(init, images, blocks), 'trained': central_gradients(trained, images, blocks)}
    result = dict(n_images=len(images), init=init_note, device=str(next(trained.parameters()).device),
                  radius='the smallest square around the central unit\'s field centre holding that share of the '
                         'mean |input gradient|, as its half-side in pixels', blocks={})
    for b in blocks:
        f = theory[b]  # the central unit (index size // 2) has its field centred here, in input pixel indices
        centre = [f['start'] + (f['size'] // 2) * f['jump']] * 2
        result['blocks'][b] = dict(rf=f['rf'], jump=f['jump'], centre=centre, rf_radius=(f['rf'] - 1) / 2, **{
            k: dict(r50=mass_radius(maps[k][b], centre, 0.5), r90=mass_radius(maps[k][b], centre, 0.9)) for k in maps})
    # Wall time, and the CPU time of all this process's threads: on a shared machine the second says what it costs.
    result['seconds'], result['cpu_seconds'] = round(time.perf_counter() - t, 2), round(time.process_time() - cpu, 2)
    result['torch_threads'] = torch.get_num_threads()
    return result, maps


def plot_effective_rf(result, maps, path):
    "Rows init and trained, a column a block: the central unit's mean |input gradient|, the theoretical field a square."
    blocks = list(result['blocks'])
    fig = Figure(figsize=(3.2 * len(blocks), 6.6))
    axs = np.array(fig.subplots(2, len(blocks), squeeze=False))
    for i, kind in enumerate(('init', 'trained')):
        for j, b in enumerate(blocks):
            ax, f, g = axs[i, j], result['blocks'][b], maps[kind][b]
            h, w = g.shape
            ax.imshow(g / g.max(), cmap='magma', vmin=0, vmax=1, interpolation='nearest')
            (cy, cx), rf = f['centre'], f['rf']  # pixel i spans i ± 0.5: the field's square is centre ± rf/2
            ax.add_patch(Rectangle((cx - rf / 2, cy - rf / 2), rf, rf, fill=False, ec='tab:cyan', lw=1.5, ls='--'))
            r90 = f[kind]['r90'] + 0.5
            ax.add_patch(Rectangle((cx - r90, cy - r90), 2 * r90, 2 * r90, fill=False, ec='white', lw=1, ls=':'))
            ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, ec='grey', lw=0.8))
            lo, hi = min(-0.5, cx - rf / 2, cy - rf / 2) - 1, max(w - 0.5, cx + rf / 2, cy + rf / 2) + 1
            ax.set(xlim=(lo, hi), ylim=(hi, lo), xticks=[], yticks=[])
            ax.set_title(f"{kind} {b}: RF {rf}\n50% within {f[kind]['r50']:g} px, 90% within {f[kind]['r90']:g}",
                         fontsize=9)
    fig.suptitle(f"mean |∂ central unit / ∂ input| over {result['n_images']} test images; dashed: the theoretical "
                 'field, dotted: 90% of the mass', fontsize=10)
    return save_figure(fig, path)


def rf_section(result, table):
    "report.md's section: the theoretical table, then the effective fields' figure and numbers."
    lines = ['## Receptive fields', '', 'The theoretical field of every layer (also in `summary.txt`):', '',
             '```', table, '```', '',
             f"The effective receptive field (Luo et al., NeurIPS 2016): the mean absolute gradient of each block's "
             f"central unit, summed over channels, with respect to the input, over {result['n_images']} test images; "
             f"at initialisation, {result['init']}. A radius r is the half-side of the smallest square around the "
             f"unit's field centre that holds that share of the gradient mass (the theoretical field's is (RF − 1)/2). "
             f"Measured in {result['seconds']:.1f} s ({result['cpu_seconds']:.1f} s of CPU time, "
             f"{result['torch_threads']} threads) on {result['device']}.", '',
             '![receptive_field](receptive_field.png)', '',
             '| block | RF | RF radius | init r50 | init r90 | trained r50 | trained r90 |',
             '|---|---|---|---|---|---|---|']
    lines += [f"| {b} | {f['rf']} | {f['rf_radius']:g} | {f['init']['r50']:g} | {f['init']['r90']:g} | "
              f"{f['trained']['r50']:g} | {f['trained']['r90']:g} |" for b, f in result['blocks'].items()]
    return marked('receptive_field', lines + ['', 'Numbers: `receptive_field.json`.'])


def receptive_fields(model, dl, seed, out, n=256):
    "A run's receptive fields: `receptive_field.json` and `.png` in `out`; returns report.md's section."
    images = test_images(dl, n)
    with torch.random.fork_rng(devices=[]):  # the run's own random streams stay where they were
        torch.manual_seed(seed)
        init = custom_resnet(model.head.fc.out_features).to(next(model.parameters()).device)
    note = f'a fresh `custom_resnet()` drawn with the run\'s seed {seed} (not the run\'s own first weights)'
    result, maps = measure(model, init, images, note)
    (Path(out) / 'receptive_field.json').write_text(json.dumps(result, indent=2) + '\n')
    plot_effective_rf(result, maps, Path(out) / 'receptive_field.png')
    return rf_section(result, rf_table(receptive_field(model)))
