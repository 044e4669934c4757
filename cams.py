"""Grad-CAM for the ResNet: `gradcam()`, `cams.py --n 10` for a run's mistakes, `cams.py --image` for any image."""
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from fastcore.script import call_parse, store_true
from matplotlib.figure import Figure

__all__ = ['gradcam', 'unit_scale', 'class_cams', 'gradcam_grid', 'cam_overlay', 'view_cam', 'misclassified_cams']


def gradcam(model, x, layer, target=None):
    "Grad-CAM maps (N×H×W in [0, 1], on the model's device) of `target` classes (default: predicted) at `layer`."
    # `x` goes to the model, not the model to `x`: fastai's Interpretation hands back its inputs on the CPU
    # whatever device the model trains on, and moving a user's model behind their back would surprise them.
    x = x.to(next(model.parameters()).device)
    acts, me = [], threading.get_ident()
    def keep(module, inp, out):
        # The hook sits on a module other threads may be running at the same moment (app.py serves several
        # requests on one model): it takes only this call's forward pass, in this thread, and leaves theirs alone.
        if threading.get_ident() != me or acts: return None
        acts.append(out)
        # Downstream in-place ops (a ReLU after a hooked BN) would overwrite `out`; the rest of the network
        # gets a copy instead, so `out` stays the activation its gradient is taken against.
        return out.clone()
    handle = layer.register_forward_hook(keep)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
            target = (logits.argmax(1) if target is None
                      else torch.as_tensor(target, device=logits.device).expand(len(x)))
            score = logits.gather(1, target.view(-1, 1)).sum()  # samples are independent in eval mode
            # autograd.grad, not backward(): a tensor-level gradient (as pytorch-grad-cam does with a tensor
            # hook, since module backward hooks break on in-place ReLUs), and no .grad left on the weights.
            (grads,) = torch.autograd.grad(score, acts[0])
    finally: handle.remove()
    a = acts[0].detach()
    weights = grads.mean((2, 3), keepdim=True)          # the gradient averaged over H and W, per channel
    cam = F.relu((weights * a).sum(1, keepdim=True))    # ReLU of the weighted sum of activations
    cam = F.interpolate(cam, size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    return unit_scale(cam)  # after the ReLU and the upsampling


def unit_scale(maps):
    "Each N×H×W map scaled to [0, 1]; a flat one (an all-zero map: no positive evidence) stays 0, not NaN."
    lo, hi = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    return torch.where(hi > lo, (maps - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(maps))


# ---- the command line: Grad-CAM for a run's highest-loss mistakes --------------------------------------------

from cli import UsageError, quiet_warnings, user_errors  # noqa: E402  (below gradcam, which needs only torch)
if __name__ == '__main__': quiet_warnings()  # `python cams.py`: before fastai's import (below), which warns
from arch import BLOCKS  # noqa: E402
from interpret import denorm, interpret, top_misclassified  # noqa: E402
from predict import eval_mode, network_view, predict, read_image, to_input  # noqa: E402
from report import marked, put_section, save_figure  # noqa: E402
from run_folder import find_run, load_model, load_run, run_data  # noqa: E402


def _overlay(ax, img, cam, title):
    ax.imshow(img, interpolation='nearest')
    if cam is not None: ax.imshow(cam, cmap='jet', alpha=0.45, interpolation='nearest', vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis('off')


def class_cams(model, interp, idx, x, layer):
    "Grad-CAM at `layer` of the predicted class and of the true class of test images `idx` (inputs `x`), on the CPU."
    block = model.get_submodule(layer)
    return [gradcam(model, x, block, c[idx].to(x.device)).cpu() for c in (interp.decoded, interp.targs)]


def gradcam_grid(model, interp, idx, layer='layer3', x=None, cams=None):
    "A `Figure` of test images `idx`: each image above its predicted class's and its true class's Grad-CAM at `layer`."
    # fastai's Interpretation re-runs just these images through the test pipeline
    x = interp[idx][0] if x is None else x
    cam_p, cam_t = class_cams(model, interp, idx, x, layer) if cams is None else cams
    vocab, t, p, imgs, n = interp.vocab, interp.targs[idx], interp.decoded[idx], denorm(x), len(idx)
    fig = Figure(figsize=(1.9 * n + 0.8, 6.2))
    axs = np.array(fig.subplots(3, n, squeeze=False))
    for k in range(n):
        prob = float(interp.preds[idx[k], p[k]])
        _overlay(axs[0, k], imgs[k], None, f'true {vocab[t[k]]}')
        _overlay(axs[1, k], imgs[k], cam_p[k], f'pred {vocab[p[k]]} ({prob:.2f})')
        _overlay(axs[2, k], imgs[k], cam_t[k], f'CAM of {vocab[t[k]]}')
    fig.suptitle(f'Grad-CAM at {layer}: rows are the image, the predicted class\'s map, the true class\'s map')
    fig.tight_layout()  # here, not only in save_figure: a notebook shows the Figure as returned
    return fig


def draw(model, interp, idx, x, layer, out):
    "One Grad-CAM figure per image (original, predicted-class CAM, true-class CAM) and gradcam.png with all."
    vocab, t, p = interp.vocab, interp.targs[idx], interp.decoded[idx]
    cam_p, cam_t = cams = class_cams(model, interp, idx, x, layer)
    imgs, files = denorm(x), []
    for k, i in enumerate(idx.tolist()):
        prob = float(interp.preds[i, p[k]])
        fig = Figure(figsize=(6.6, 2.6))
        axs = fig.subplots(1, 3)
        _overlay(axs[0], imgs[k], None, f'true {vocab[t[k]]}')
        _overlay(axs[1], imgs[k], cam_p[k], f'CAM of predicted {vocab[p[k]]} ({prob:.2f})')
        _overlay(axs[2], imgs[k], cam_t[k], f'CAM of true {vocab[t[k]]}')
        fig.suptitle(f'test image {i}: {layer}', fontsize=9)
        files.append(save_figure(fig, out / f'gradcam_{k + 1:02d}.png').name)
    return files, save_figure(gradcam_grid(model, interp, idx, layer, x, cams), out / 'gradcam.png').name


def compare_layers(model, interp, idx, x, out):
    "The predicted class's Grad-CAM of the same images at every block, from 32×32 (prep) to 4×4 (layer3)."
    p = interp.decoded[idx].to(x.device)
    cams = {name: gradcam(model, x, model.get_submodule(name), p).cpu() for name in BLOCKS}
    imgs, n = denorm(x), len(idx)
    fig = Figure(figsize=(1.9 * (len(BLOCKS) + 1), 1.9 * n + 0.6))
    axs = np.array(fig.subplots(n, len(BLOCKS) + 1, squeeze=False))
    for k in range(n):
        _overlay(axs[k, 0], imgs[k], None, f'pred {interp.vocab[p[k]]}')
        for j, name in enumerate(BLOCKS, 1):
            _overlay(axs[k, j], imgs[k], cams[name][k], name)
    fig.suptitle('Grad-CAM of the predicted class at each block (prep 32×32, layer1 16×16, layer2 8×8, layer3 4×4)',
                 fontsize=9)
    return save_figure(fig, out / 'gradcam_layers.png').name


def add_to_report(report, layer, files, grid, layers_png, note):
    "Put the Grad-CAM section into report.md, replacing the one an earlier cams.py run wrote."
    lines = [f'## Grad-CAM of the misclassified test images ({layer})', '', note, '', f'![gradcam]({grid})', '']
    if layers_png: lines += ['### The same images at every block', '', f'![gradcam_layers]({layers_png})', '']
    put_section(report, marked('cams.py', lines + [f'![{f[:-4]}]({f})' for f in files]))


def explain(run=None, n=10, layer='layer3', out=None, compare=False, data=None, device=None):
    "Grad-CAM figures for a run's `n` highest-loss misclassified test images; returns the files written."
    if n < 1: raise UsageError(f'--n must be at least 1, got {n}')
    if layer not in BLOCKS: raise UsageError(f'--layer {layer!r} is not a block; choose one of {", ".join(BLOCKS)}')
    run = find_run(run)
    out = Path(out) if out else run
    out.mkdir(parents=True, exist_ok=True)
    learn = load_run(run, data, device)
    interp = interpret(learn)
    idx = top_misclassified(interp, n)
    wrong = int((interp.decoded != interp.targs).sum())
    note = f'The {len(idx)} misclassified test images with the highest loss, of {wrong} misclassified.'
    if len(idx) < n: print(f'cams.py: only {len(idx)} misclassified test image(s); drawing {len(idx)} instead of {n}')
    if not len(idx): return []
    x = interp[idx][0]  # fastai's Interpretation re-runs just these images through the test pipeline
    files, grid = draw(learn.model, interp, idx, x, layer, out)
    layers_png = compare_layers(learn.model, interp, idx, x, out) if compare else None
    add_to_report(out / 'report.md', layer, files, grid, layers_png, note)
    print(f'cams.py: wrote {len(files)} Grad-CAM figures, {grid}' + (f', {layers_png}' if layers_png else '')
          + f' in {out}')
    return [out / f for f in [*files, grid] + ([layers_png] if layers_png else [])]


def explain_images(images, run=None, layer='layer3', target=None, out=None, data=None, device=None, tta=False):
    "Print the top-3 classes of each image file (`tta`: with mirror TTA) and save its Grad-CAM beside it (or in `out`)."
    if layer not in BLOCKS: raise UsageError(f'--layer {layer!r} is not a block; choose one of {", ".join(BLOCKS)}')
    images = list(dict.fromkeys(Path(p) for p in images))
    views = [network_view(read_image(p)) for p in images]  # all read first: a bad third image fails before any work
    files = [(Path(out) if out else p.parent) / f'{p.stem}.gradcam.png' for p in images]
    for i, f in enumerate(files):
        if f in files[:i]:
            raise UsageError(f'{images[files.index(f)]} and {images[i]} would both be drawn to {f}; '
                             'give them separately')
    model, classes = load_model(find_run(run), device, data)
    if target is not None and target not in classes:
        raise UsageError(f'--target {target!r} is not a class of this run; choose one of {", ".join(classes)}')
    if out: Path(out).mkdir(parents=True, exist_ok=True)
    for path, view, file in zip(images, views, files):
        ranked = predict(model, view, classes, k=len(classes), tta=tta)  # every class: --target's probability is there
        shown = [('pred', ranked[0])] + [('target', p) for p in ranked if p.label == target]
        draw_image(model, view, shown, classes, layer, f'{path.name}: Grad-CAM at {layer}', file)
        print(f'{path}: ' + ', '.join(f'{p.label} {p.prob:.3f}' for p in ranked[:3])
              + f'{" (mirror TTA)" if tta else ""} (Grad-CAM: {file})')
    return files


def draw_image(model, view, shown, classes, layer, title, file):
    "The 32×32 input the network saw, then the Grad-CAM of each (role, `Prediction`) in `shown`, saved as `file`."
    x, block = to_input(view), model.get_submodule(layer)
    fig = Figure(figsize=(2.2 * (len(shown) + 1), 2.6))
    axs = fig.subplots(1, len(shown) + 1)
    _overlay(axs[0], view, None, f'input {view.shape[1]}×{view.shape[0]}')
    for ax, (role, p) in zip(axs[1:], shown):
        cam = gradcam(model, x, block, classes.index(p.label))[0].cpu().numpy()
        _overlay(ax, view, cam, f'{role} {p.label} ({p.prob:.2f})')
    fig.suptitle(title, fontsize=9)
    try: return save_figure(fig, file)
    except OSError as e: raise UsageError(f'cannot write {file} ({e.strerror or e}); pass --out DIR') from None


def evaluate_explanations(run=None, n=500, data=None, device=None, out=None, seed=0):
    "Score a run's explanations (cam_eval.py) on `n` class-balanced test images; writes cam_eval.json, .csv and .png."
    import cam_eval
    from data import load_arrays
    from precision import device_name
    cam_eval._library()  # the extra's one-line error before any work
    if n < 2: raise UsageError(f'--n must be at least 2 for --evaluate, got {n}')
    run = find_run(run)
    out = Path(out) if out else run
    out.mkdir(parents=True, exist_ok=True)
    model, classes = load_model(run, device, data)
    folder = run_data(run, data)
    data_classes, arrays = load_arrays(folder, verbose=False)
    if list(data_classes) != list(classes):
        raise UsageError(f'{folder} has classes {data_classes}, the run {classes}; pass --data DIR, the run\'s data')
    images, labels = arrays['test']
    if n > len(labels): raise UsageError(f'--n {n} is more than the {len(labels)} test images in {folder}')
    idx = cam_eval.balanced_order(labels, n, len(classes), seed)
    dev = next(model.parameters()).device
    where = device_name(dev)
    k = min(n, 100)
    print(f'cams.py: scoring the explanations of {run} on {n} class-balanced test images (ROAD and the sanity checks '
          f'on {k}), every method and baseline at {", ".join(BLOCKS)}; {where}, fp32 channels-last', flush=True)
    r = cam_eval.evaluate_cams(model, cam_eval.inputs(images[idx]).to(dev), BLOCKS, n_road=k, n_sanity=k, seed=seed)
    from importlib.metadata import version
    r.update(run=str(run), device=where, precision='fp32', versions={'torch': torch.__version__,
                                                                   'grad-cam': version('grad-cam')})
    files = cam_eval.write_results(r, out, run.name)
    s = r['seconds']
    print(f'cams.py: {s["total"]:.0f} s: maps {s["maps"]:.0f} s, deletion and insertion '
          f'{s["deletion_insertion"]:.0f} s, ROAD {s["road"]:.0f} s, sanity checks {s["sanity"]:.0f} s, '
          f'Score-CAM timed {s["score_cam_measured"]:.0f} s', flush=True)
    cost = r['score_cam_seconds_per_image']
    print('cams.py: Score-CAM left out: ' + ', '.join(f'{b} {c:.2f} s' for b, c in cost.items())
          + f' per image, {sum(cost.values()) * n / 60:.0f} min more for {n} images', flush=True)
    print(f'cams.py: {r["verdict"]}', flush=True)
    print(f'cams.py: wrote {", ".join(f.name for f in files)} and a section of report.md in {out}', flush=True)
    return files


# ---- pictures for a front end (app.py): arrays, not figures ---------------------------------------------------

def cam_overlay(img, cam=None, opacity=0.45, scale=1):
    "The H×W×3 uint8 `img` with Grad-CAM `cam` (H×W in [0, 1]) over it in jet colours at `opacity`, `scale`× larger."
    from matplotlib import colormaps
    out = np.asarray(img, dtype=np.float32) / 255
    if cam is not None and opacity > 0:  # the colours cams.py's figures use (`_overlay`), blended by hand
        heat = colormaps['jet'](np.clip(np.asarray(cam, dtype=np.float32), 0, 1))[..., :3]
        out = (1 - opacity) * out + opacity * heat
    out = np.rint(out * 255).astype(np.uint8)
    # Enlarged by repeating pixels: a 32×32 image stays a picture of 32×32 pixels, not a browser's blur of one.
    return out.repeat(scale, 0).repeat(scale, 1)


def view_cam(model, view, layer='layer3', target=None):
    "Grad-CAM (H×W in [0, 1], numpy) at block `layer` of class index `target` (default: predicted) for a network view."
    if layer not in BLOCKS: raise UsageError(f'layer {layer!r} is not a block; choose one of {", ".join(BLOCKS)}')
    return gradcam(model, to_input(view), model.get_submodule(layer), target)[0].cpu().numpy()


def misclassified_cams(model, interp, n, layer='layer3', x=None):
    "The `n` highest-loss misclassified test images as (H×W×3 uint8 image, Grad-CAM of the predicted class, caption)."
    # `x`: the inputs of the top `n` or more, taken from `interp` once by a caller that asks many times (app.py):
    # `interp[idx]` runs the Learner's get_preds, which is neither quick nor for several threads at once.
    idx = top_misclassified(interp, n)
    if not len(idx): return []
    # fastai's Interpretation re-runs just these images through the test pipeline.
    x = interp[idx][0] if x is None else x[:len(idx)]
    cams = gradcam(model, x, model.get_submodule(layer), interp.decoded[idx].to(x.device)).cpu().numpy()
    imgs = np.rint(denorm(x) * 255).astype(np.uint8)  # the test image's own pixels: normalizing is undone exactly
    vocab = interp.vocab
    return [(img, cam, f'true {vocab[int(interp.targs[i])]}, predicted {vocab[int(interp.decoded[i])]} '
                       f'({float(interp.preds[i, interp.decoded[i]]):.2f})')
            for img, cam, i in zip(imgs, cams, idx.tolist())]


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(n: int = None,                      # misclassified test images to explain (10), or to --evaluate on (500)
         run: str = None,                    # run folder (default: the newest under runs/)
         layer: str = 'layer3',              # block to explain: layer3 (4×4), layer2 (8×8), layer1 (16×16) or prep
         out: str = None,                    # where the figures go (default: the run folder; for --image, beside each)
         compare_layers: store_true = False, # also draw the same images at every block
         data: str = None,                   # CIFAR folder, if not the one the run used
         device: str = None,                 # torch device (default: the GPU if there is one)
         # image files to classify and explain instead of the test set: repeat the flag, or list several after it
         image: Annotated[str, {'action': 'extend', 'nargs': '+'}] = None,
         target: str = None,                 # with --image: also draw the Grad-CAM of this class
         # with --image: mirror TTA, the mean of each image's and its mirror's logits
         tta: store_true = False,
         # score the explanations instead: every CAM method and baseline at every block (the [cams] extra)
         evaluate: store_true = False):
    "Grad-CAM of a run's misclassified test images, or of --image files; --evaluate: how faithful the maps are."
    with user_errors('cams.py'):
        if evaluate:
            if image or compare_layers or target or tta or layer != 'layer3':
                raise UsageError('--evaluate scores every block on the test set; it takes --n, --run, --out, --data, '
                                 '--device')
            return evaluate_explanations(run, 500 if n is None else n, data, device, out)
        if image:
            if compare_layers: raise UsageError('--compare-layers is for a run\'s test images, not --image')
            return explain_images(image, run, layer, target, out, data, device, tta)
        if target is not None: raise UsageError('--target needs --image')
        if tta: raise UsageError('--tta is for --image; a run\'s mirror-TTA accuracy: python experiments/evaluate.py')
        explain(run, 10 if n is None else n, layer, out, compare_layers, data, device)
