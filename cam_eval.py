"""Does a CAM show what the network used? Deletion, insertion and ROAD against baselines; randomization checks."""
import contextlib, copy, io, itertools, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cams import gradcam, unit_scale
from interpret import denorm

__all__ = ['METHODS', 'BASELINES', 'CASCADE', 'cam_maps', 'random_maps', 'gaussian_maps', 'sobel_maps', 'blur',
           'logits', 'probabilities', 'perturbation_curves', 'auc', 'road', 'spearman', 'randomized', 'bootstrap',
           'balanced_order', 'inputs', 'evaluate_cams', 'sanity_verdicts', 'verdict', 'failures', 'write_results',
           'plot_results']

# Ours, then pytorch-grad-cam's (the [cams] extra): four gradient methods and one that reads activations only.
METHODS = ('gradcam', 'gradcam++', 'layercam', 'hirescam', 'eigencam')
BASELINES = ('random', 'gaussian', 'sobel')
# Cascading randomization (Adebayo et al. 2018): the network's parts from the head down, one more each step.
CASCADE = ('head.fc', 'layer3.res', 'layer3.conv', 'layer2', 'layer1.res', 'layer1.conv', 'prep')
STEPS = 16                # pixels removed or added in 16 equal steps of 64
BLUR_SIGMA = 3.           # insertion starts from the image blurred with a Gaussian of σ 3 px (kernel 13)
ROAD_PERCENTILES = (20, 40, 60, 80)
FAILS_ABOVE = 0.5         # a map whose rank correlation with its original stays above this "barely moves"


def _library():
    "pytorch-grad-cam, or the one line that says how to install it."
    try: import pytorch_grad_cam
    except ImportError:
        from cli import UsageError
        raise UsageError('the CAM evaluation needs pytorch-grad-cam: '
                         "pip install -c constraints.txt -e '.[cams]'") from None
    return pytorch_grad_cam


def _library_cams(name, model, x, layers, target):
    "pytorch-grad-cam's method `name` at each of `layers` (modules), from one forward and backward pass: a list."
    pgc = _library()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cls = {'gradcam++': pgc.GradCAMPlusPlus, 'layercam': pgc.LayerCAM, 'hirescam': pgc.HiResCAM,
           'xgradcam': pgc.XGradCAM, 'eigencam': pgc.EigenCAM, 'scorecam': pgc.ScoreCAM,
           'pgc-gradcam': pgc.GradCAM}[name]
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    with cls(model=model, target_layers=list(layers)) as cam:
        # BaseCAM.forward without its last step, which averages the layers' maps into one: each layer's map, as
        # a call with that layer alone returns it (scaled to [0, 1] and resized to the input by the library).
        if name == 'scorecam': cam.batch_size = 256
        x = x.to(cam.device)
        outputs = cam.activations_and_grads(x)
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, outputs)).backward(retain_graph=True)
        with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's tqdm bar for every batch
            maps = cam.compute_cam_per_layer(x, targets, False)
    model.zero_grad(set_to_none=True)  # the library leaves .grad on the weights
    # The library scales each layer's map to [0, 1] before resizing it and once more after (aggregate_multi_layers):
    # the second scaling, here, makes the maps those of a call with that layer alone.
    return [unit_scale(torch.from_numpy(m[:, 0]).float()) for m in maps]


def cam_maps(method, model, x, blocks, target):
    "`method`'s maps (N×H×W in [0, 1], CPU) of classes `target` for inputs `x`: {block name: maps}."
    if method == 'gradcam':
        return {b: gradcam(model, x, model.get_submodule(b), torch.as_tensor(target)).float().cpu() for b in blocks}
    return dict(zip(blocks, _library_cams(method, model, x, [model.get_submodule(b) for b in blocks], target)))


def random_maps(n, res, size=32, seed=0):
    "Uniform noise at a block's own res×res, upsampled as the CAMs are: as blurry as that block's maps."
    noise = torch.rand(n, 1, res, res, generator=torch.Generator().manual_seed(seed))
    return unit_scale(F.interpolate(noise, size=(size, size), mode='bilinear', align_corners=False)[:, 0])


def gaussian_maps(n, size=32, sigma=8.):
    "A Gaussian centred on the image: 'the object is in the middle', which CIFAR's photos often are."
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * sigma ** 2))
    return unit_scale(g.expand(n, size, size).clone())


def sobel_maps(x):
    "The Sobel edge magnitude of each image's grey values: a map that needs no network at all."
    grey = (torch.from_numpy(denorm(x)) * torch.tensor([0.299, 0.587, 0.114])).sum(-1)[:, None]
    k = torch.tensor([[1., 0, -1], [2, 0, -2], [1, 0, -1]])
    gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode='replicate'), k.view(1, 1, 3, 3))
    gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode='replicate'), k.t().reshape(1, 1, 3, 3))
    return unit_scale((gx ** 2 + gy ** 2).sqrt()[:, 0])


def blur(x, sigma=BLUR_SIGMA):
    "Inputs blurred with a Gaussian of `sigma` pixels (reflect padding): insertion's starting point."
    from torchvision.transforms.functional import gaussian_blur
    k = 2 * round(2 * sigma) + 1
    return gaussian_blur(x, [k, k], [sigma, sigma])


def _order(maps, seed=0):
    "Each map's pixels ranked highest first (N×H·W ranks); ties in a random order, not top-left first."
    flat = maps.flatten(1)
    perm = torch.rand(flat.shape, generator=torch.Generator().manual_seed(seed)).argsort(1)
    order = perm.gather(1, (-flat.gather(1, perm)).argsort(dim=1, stable=True))
    return torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))


@torch.no_grad()
def logits(model, x, bs=256):
    "The model's logits for inputs `x`, in batches, fp32 channels-last, on the CPU."
    dev = next(model.parameters()).device
    return torch.cat([model(b.to(dev).contiguous(memory_format=torch.channels_last)).float().cpu()
                      for b in x.split(bs)])


def probabilities(model, x, target, bs=256):
    "The model's softmax probability (with its `logit_scale`) of class `target[i]` for each input `x[i]`."
    return F.softmax(logits(model, x, bs) * getattr(model, 'logit_scale', 1.), 1).gather(1, target.view(-1, 1))[:, 0]


def perturbation_curves(model, x, maps, target, steps=STEPS, seed=0, ends=None):
    "Deletion and insertion curves, N×(steps+1) each: the probability of `target` as pixels go in the maps' order."
    # Deletion puts removed pixels at the data mean (0 after Normalize); insertion starts from the blurred image and
    # puts the original pixels back. The curves' ends are the same for every map, and `ends` may bring them.
    n, h, w = maps.shape
    rank = _order(maps, seed).view(n, 1, h, w)
    k = torch.arange(1, steps).view(-1, 1, 1, 1, 1) * (h * w) // steps   # the inner steps; the ends are shared
    first = rank[None] < k                                                # steps-1 × N × 1 × H × W
    blurred = blur(x)
    deleted = torch.where(first, torch.zeros_like(x), x[None]).flatten(0, 1)
    inserted = torch.where(first, x[None], blurred[None]).flatten(0, 1)
    t = target.repeat(steps - 1)
    p_del, p_ins = (probabilities(model, v, t).view(steps - 1, n).t() for v in (deleted, inserted))
    if ends is None:
        ends = [probabilities(model, v, target) for v in (x, torch.zeros_like(x), blurred)]
    p_x, p_mean, p_blur = ends
    return (torch.cat([p_x[:, None], p_del, p_mean[:, None]], 1),
            torch.cat([p_blur[:, None], p_ins, p_x[:, None]], 1))


def auc(curve):
    "Area under each curve (N×K) over the fraction of pixels changed, 0 to 1, by the trapezoid rule."
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)


class _Probabilities(torch.nn.Module):
    "The model's logits times its `logit_scale`: what ROAD's softmax target needs to read its probabilities."
    def __init__(self, model):
        super().__init__()
        self.model, self.scale = model, getattr(model, 'logit_scale', 1.)

    def forward(self, x): return self.model(x) * self.scale


def road(model, x, maps, target, percentiles=ROAD_PERCENTILES, seed=0):
    "ROAD (Rong et al. 2022) as pytorch-grad-cam's `ROADCombined`: per image, (LeRF − MoRF) / 2 of the probability."
    _library()
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    # ROADCombined averages (score after − score before) over the percentiles, LeRF's then MoRF's; the score
    # before cancels in their difference, so here it is left out (return_diff=False): the same value from a third
    # fewer forward passes. The same order of calls keeps the imputation's noise the same (`seed`).
    targets, cams, net = [ClassifierOutputSoftmaxTarget(int(t)) for t in target], maps.numpy(), _Probabilities(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        lerf, morf = (np.mean([metric(p)(x, cams, targets, net, return_diff=False) for p in percentiles], 0)
                      for metric in (ROADLeastRelevantFirst, ROADMostRelevantFirst))
    return torch.from_numpy(np.asarray((lerf - morf) / 2, dtype=np.float32)).view(-1)


def spearman(a, b):
    "Spearman's rank correlation of each pair of maps (N×H×W each); NaN where a map is flat."
    from scipy.stats import rankdata
    ra, rb = (torch.from_numpy(rankdata(m.flatten(1).numpy(), axis=1)).double() for m in (a, b))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).float()


def randomized(model, upto, seed=0):
    "A copy of `model` with the parts of CASCADE up to and including `upto` re-initialized, seeded."
    m = copy.deepcopy(model)
    torch.manual_seed(seed)
    for name in CASCADE[:CASCADE.index(upto) + 1]:
        for mod in m.get_submodule(name).modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)): mod.reset_parameters()
            # Its learned scale and shift go back to their start; its running statistics, a property of the data
            # flowing in, stay, so that a randomized layer's outputs keep their scale.
            elif isinstance(mod, torch.nn.BatchNorm2d): torch.nn.init.ones_(mod.weight); torch.nn.init.zeros_(mod.bias)
    return m


def bootstrap(values, seed=0, n=2000):
    "The mean of `values` and its 95% percentile-bootstrap interval, NaNs left out: (mean, [lo, hi], n)."
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v): return float('nan'), [float('nan')] * 2, 0
    means = v[np.random.default_rng(seed).integers(0, len(v), (n, len(v)))].mean(1)
    return float(v.mean()), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))], len(v)


# ---- the evaluation of a run: every method and baseline at every block, on N class-balanced test images ----------

def balanced_order(labels, n, n_classes, seed=0):
    "`n` test images as even across the classes as they allow (seeded), ordered so that every prefix is balanced too."
    from data import balanced_subset
    idx = balanced_subset(labels, n, n_classes, seed)
    by_class = [idx[labels[idx] == c] for c in range(n_classes)]  # ROAD and the sanity checks take a prefix
    return np.array([i for row in itertools.zip_longest(*by_class) for i in row if i is not None])


def inputs(images):
    "uint8 N×3×H×W images as the network's inputs, normalized as the test set is."
    from fastai.vision.core import cifar_stats
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    return (torch.as_tensor(images).float() / 255 - mean) / std


def _resolutions(model, blocks):
    "Each block's output height (32, 16, 8, 4 for the ResNet's prep … layer3)."
    sizes = {}
    def keep(b): return lambda module, inp, out: sizes.update({b: out.shape[-1]})  # returns None: output unchanged
    hooks = [model.get_submodule(b).register_forward_hook(keep(b)) for b in blocks]
    try:
        with torch.no_grad(): model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    finally:
        for h in hooks: h.remove()
    return sizes


def _all_maps(model, x, target, blocks, methods, with_sobel=True):
    "{(block, method): maps} for every method at every block, with Sobel's (the same at every block)."
    out = {(b, k): m for k in methods for b, m in cam_maps(k, model, x, blocks, target).items()}
    if with_sobel: out.update({(b, 'sobel'): sobel_maps(x) for b in blocks})
    return out


def _sanity(model, x, target, blocks, methods, n_classes, seed):
    "Rank correlations with the original maps along the randomization cascade, and with another class's maps."
    original = _all_maps(model, x, target, blocks, methods)
    cascade = {key: [] for key in original}
    for step in CASCADE:
        now = _all_maps(randomized(model, step, seed), x, target, blocks, methods)
        for key in original: cascade[key].append(bootstrap(spearman(original[key], now[key]), seed))
    other = (target + torch.randint(1, n_classes, target.shape, generator=torch.Generator().manual_seed(seed))) \
        % n_classes
    elsewhere = _all_maps(model, x, other, blocks, methods)
    classes = {key: bootstrap(spearman(original[key], elsewhere[key]), seed) for key in original}
    return cascade, classes


def _score_cam_cost(model, x, target, blocks):
    "Seconds Score-CAM takes per image at each block (one forward pass per channel), measured on `x`."
    cost = {}
    for b in blocks:
        t = time.perf_counter()
        cam_maps('scorecam', model, x, [b], target)
        cost[b] = (time.perf_counter() - t) / len(x)
    return cost


def evaluate_cams(model, x, blocks, methods=METHODS, n_road=100, n_sanity=100, chunk=50, seed=0, say=print,
                  score_cam_images=2):
    "Deletion, insertion and ROAD of every method and baseline at every block, and the sanity checks: a dict."
    # The explained class is the predicted one, so the labels are not needed.
    from fastprogress.fastprogress import progress_bar
    times, n = {}, len(x)
    t0 = time.perf_counter()
    model = model.eval().to(memory_format=torch.channels_last)  # in place: the forward passes' fastest layout here
    out = logits(model, x)
    target, n_classes = out.argmax(1), out.shape[1]  # the explained class: the predicted one
    res = _resolutions(model, blocks)
    names = [*methods, *BASELINES]
    # The Gaussian and Sobel maps are the same at every block: scored once, under the block '*', listed at each.
    keys = [(b, k) for b in blocks for k in [*methods, 'random']] + [('*', k) for k in BASELINES if k != 'random']
    scores = {key: {'deletion': [], 'insertion': [], 'road': []} for key in keys}
    curves = {key: [] for key in keys}
    t_maps = t_road = 0.
    for start in progress_bar(range(0, n, chunk), leave=False):
        xs, ts = x[start:start + chunk], target[start:start + chunk]
        t = time.perf_counter()
        maps = _all_maps(model, xs, ts, blocks, methods, with_sobel=False)
        maps.update({(b, 'random'): random_maps(len(xs), res[b], seed=seed * 1000 + start + i)
                     for i, b in enumerate(blocks)})
        maps.update({('*', 'gaussian'): gaussian_maps(len(xs)), ('*', 'sobel'): sobel_maps(xs)})
        t_maps += time.perf_counter() - t
        ends = [probabilities(model, v, ts) for v in (xs, torch.zeros_like(xs), blur(xs))]
        for key, m in maps.items():
            d, i = perturbation_curves(model, xs, m, ts, seed=seed + start, ends=ends)
            scores[key]['deletion'].append(auc(d))
            scores[key]['insertion'].append(auc(i))
            curves[key].append(torch.stack([d, i]))
        k_road = max(0, min(len(xs), n_road - start))
        if k_road:
            t = time.perf_counter()
            for key, m in maps.items():
                scores[key]['road'].append(road(model, xs[:k_road], m[:k_road], ts[:k_road], seed=seed + start))
            t_road += time.perf_counter() - t
        say(f'cams.py: {min(start + chunk, n)}/{n} images scored, {time.perf_counter() - t0:.0f} s')
    times['maps'], times['road'] = round(t_maps, 1), round(t_road, 1)
    times['deletion_insertion'] = round(time.perf_counter() - t0 - t_maps - t_road, 1)
    scores = {key: {m: torch.cat(v).numpy() if v else np.zeros(0) for m, v in d.items()} for key, d in scores.items()}
    for d in scores.values(): d['ins_minus_del'] = d['insertion'] - d['deletion']
    curves = {key: torch.cat(v, 1).numpy() for key, v in curves.items()}  # 2 × N × (STEPS+1)
    for b in blocks:
        for k in BASELINES:
            if ('*', k) in scores: scores[(b, k)], curves[(b, k)] = scores[('*', k)], curves[('*', k)]
    t = time.perf_counter()
    k = min(n, n_sanity)
    cascade, classes = _sanity(model, x[:k], target[:k], blocks, methods, n_classes, seed)
    times['sanity'] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    score_cam = _score_cam_cost(model, x[:score_cam_images], target[:score_cam_images], blocks)
    times['score_cam_measured'] = round(time.perf_counter() - t, 1)
    times['total'] = round(time.perf_counter() - t0, 1)
    return _summary(blocks, names, scores, curves, cascade, classes, score_cam, times, n, n_road, k, seed)


def _stat(values, seed):
    mean, ci, k = bootstrap(values, seed)
    return {'mean': mean, 'ci95': ci, 'n_images': k}


def _summary(blocks, names, scores, curves, cascade, classes, score_cam, times, n, n_road, n_sanity, seed):
    "The evaluation as cam_eval.json holds it, with each method's difference from the random map, paired by image."
    metrics = {}
    for b in blocks:
        metrics[b] = {}
        for k in names:
            row = {}
            for m in ('deletion', 'insertion', 'ins_minus_del', 'road'):
                v, r = scores[(b, k)][m], scores[(b, 'random')][m]
                row[m] = {**_stat(v, seed), 'vs_random': _stat(v - r, seed) if len(v) else None}
            metrics[b][k] = row
    r = {
        'n_images': n, 'n_road': min(n, n_road), 'n_sanity': n_sanity, 'seed': seed, 'steps': STEPS,
        'blur_sigma': BLUR_SIGMA, 'road_percentiles': list(ROAD_PERCENTILES), 'fails_above': FAILS_ABOVE,
        'blocks': list(blocks), 'methods': [k for k in names if k not in BASELINES], 'baselines': list(BASELINES),
        'metrics': metrics,
        'curves': {b: {k: {'deletion': curves[(b, k)][0].mean(0).tolist(),
                           'insertion': curves[(b, k)][1].mean(0).tolist()} for k in names} for b in blocks},
        'sanity': {'cascade': list(CASCADE),
                   'randomization': {b: {k: [{'mean': s[0], 'ci95': s[1], 'n_images': s[2]}
                                             for s in cascade[(b, k)]] for k in [*names[:-3], 'sobel']}
                                     for b in blocks},
                   'other_class': {b: {k: {'mean': s[0], 'ci95': s[1], 'n_images': s[2]}
                                       for (bb, k), s in classes.items() if bb == b} for b in blocks}},
        'score_cam_seconds_per_image': score_cam,
        'seconds': times,
    }
    sanity = sanity_verdicts(r)
    def gain(b): return scores[(b, 'gradcam')]['ins_minus_del'] - scores[(b, 'random')]['ins_minus_del']
    ranked = sorted((b for b in blocks if not sanity[(b, 'gradcam')][2]), key=lambda b: -gain(b).mean())
    if len(ranked) > 1:  # the best block against the next, paired by image
        r['block_difference'] = {**_stat(gain(ranked[0]) - gain(ranked[1]), seed), 'blocks': ranked[:2]}
    r['verdict'], r['recommended'] = verdict(r)
    return r


# ---- what the numbers say: the verdict, the files ---------------------------------------------------------------

def _above(block):
    "The index in CASCADE of the last step before `block`'s own weights: everything that reads its output, randomized."
    return min(j for j, c in enumerate(CASCADE) if c.split('.')[0] == block) - 1


def sanity_verdicts(r):
    "{(block, method): (ρ with what reads the block randomized, ρ with another class's, fails, not class-specific)}."
    out = {}
    for b in r['blocks']:
        for k, steps in r['sanity']['randomization'][b].items():
            rho, other = steps[_above(b)]['mean'], r['sanity']['other_class'][b][k]['mean']
            out[(b, k)] = rho, other, not rho < r['fails_above'], not other < r['fails_above']
    return out


def verdict(r):
    "The evaluation's answer in words: which block to read Grad-CAM at, and which maps fail the sanity checks."
    sanity, m = sanity_verdicts(r), r['metrics']
    def gain(b, k): return m[b][k]['ins_minus_del']['vs_random']
    passing = [b for b in r['blocks'] if not sanity[(b, 'gradcam')][2]]
    ranked = sorted(passing, key=lambda b: -gain(b, 'gradcam')['mean'])
    if not ranked: return 'Grad-CAM fails the randomization check at every block: no block can be recommended.', None
    best, g = ranked[0], gain(ranked[0], 'gradcam')
    text = (f'{best} is the block to read Grad-CAM at: its maps beat a random map as blurry as theirs by '
            f'{g["mean"]:+.3f} in insertion − deletion AUC (95% CI {g["ci95"][0]:+.3f} to {g["ci95"][1]:+.3f}), '
            f'and change when the weights that read {best} are randomized (ρ = {sanity[(best, "gradcam")][0]:.2f})')
    if len(ranked) > 1:
        second = ranked[1]
        d = r['block_difference']
        verb = 'ahead of' if d['ci95'][0] > 0 else 'not separable from'
        text += (f'; it is {verb} {second} ({d["mean"]:+.3f}, 95% CI {d["ci95"][0]:+.3f} to {d["ci95"][1]:+.3f}, '
                 'paired by image)')
    return text + '.', best


def failures(r):
    "The sanity checks' failures in words: maps that ignore the weights reading their block, or the class."
    sanity = sanity_verdicts(r)
    moved = [f'{k} at {b}' for (b, k), s in sanity.items() if s[2] and k not in r['baselines']]
    same = [f'{k} at {b}' for (b, k), s in sanity.items() if s[3] and k not in r['baselines']]
    return (f'Barely move (ρ ≥ {r["fails_above"]}) when the weights that read their block are randomized, so they '
            'show the image more than what the model does with it: ' + (', '.join(moved) or 'none')
            + f'. Barely change with the explained class (ρ ≥ {r["fails_above"]} with another class\'s map): '
            + (', '.join(same) or 'none') + '. Sobel edges, which use no network, fail both by construction.')



def write_results(r, out, run_name):
    "cam_eval.json, cam_eval.csv and cam_eval.png in `out`, and a section of its report.md; the files written."
    from report import marked, put_section, save_json
    out = Path(out)
    r['verdict'], r['recommended'] = verdict(r)  # here too, so that the files can be redrawn from cam_eval.json
    r['failures'] = failures(r)
    save_json(out / 'cam_eval.json', r)
    rows = ['block,method,metric,mean,ci95_lo,ci95_hi,n_images,vs_random_mean,vs_random_lo,vs_random_hi']
    for b in r['blocks']:
        for k, ms in r['metrics'][b].items():
            for metric, s in ms.items():
                v = s['vs_random'] or {'mean': '', 'ci95': ['', '']}
                rows.append(f'{b},{k},{metric},{s["mean"]:.5f},{s["ci95"][0]:.5f},{s["ci95"][1]:.5f},{s["n_images"]},'
                            + (f'{v["mean"]:.5f},{v["ci95"][0]:.5f},{v["ci95"][1]:.5f}' if v['mean'] != '' else ',,'))
        for k, steps in r['sanity']['randomization'][b].items():
            for step, s in zip(r['sanity']['cascade'], steps):
                rows.append(f'{b},{k},spearman_after_randomizing_{step},{s["mean"]:.5f},{s["ci95"][0]:.5f},'
                            f'{s["ci95"][1]:.5f},{s["n_images"]},,,')
            s = r['sanity']['other_class'][b][k]
            rows.append(f'{b},{k},spearman_with_other_class,{s["mean"]:.5f},{s["ci95"][0]:.5f},{s["ci95"][1]:.5f},'
                        f'{s["n_images"]},,,')
    (out / 'cam_eval.csv').write_text('\n'.join(rows) + '\n')
    plot_results(r, out / 'cam_eval.png', run_name)
    table = ['| block | method | deletion ↓ (vs random) | insertion ↑ (vs random) | ROAD ↑ (vs random) | '
             'ρ randomized | ρ other class |', '|' + ' --- |' * 7]
    sanity = sanity_verdicts(r)
    for b in r['blocks']:
        for k, ms in r['metrics'][b].items():
            cells = [f'{ms[x]["mean"]:.3f} ({ms[x]["vs_random"]["mean"]:+.3f})' if k != 'random'
                     else f'{ms[x]["mean"]:.3f}' for x in ('deletion', 'insertion', 'road')]
            s = sanity.get((b, k))
            cells += [f'{s[0]:.2f}' + (' fails' if s[2] else ''), f'{s[1]:.2f}'] if s else ['', '']
            table.append(f'| {b} | {k} | ' + ' | '.join(cells) + ' |')
    lines = ['## Do the explanations show what the network used?', '', r['verdict'], '', r['failures'], '',
             f'{r["n_images"]} class-balanced test images (ROAD on {r["n_road"]}, sanity checks on {r["n_sanity"]}); '
             'the explained class is the predicted one; "vs random" is the mean difference from a random map at the '
             'block\'s own resolution, paired by image; ρ is the Spearman correlation with the original map after '
             'the weights that read the block are randomized, and with the map of another class '
             f'([cam_eval.json](cam_eval.json), [cam_eval.csv](cam_eval.csv)).', '', *table, '',
             '![cam_eval](cam_eval.png)']
    put_section(out / 'report.md', marked('cam_eval', lines))
    return [out / f for f in ('cam_eval.json', 'cam_eval.csv', 'cam_eval.png')]


def plot_results(r, path, run_name):
    "Per block each method against the random map, the curves at the recommended block, the randomization curves."
    from matplotlib.figure import Figure
    from report import save_figure
    blocks, names = r['blocks'], [*r['methods'], *r['baselines']]
    colours = dict(zip(names, ['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'black', 'tab:gray',
                               'tab:brown']))
    fig = Figure(figsize=(15, 8.5))
    axs = fig.subplots(2, 3)
    for ax, (metric, better) in zip(axs[0], (('deletion', 'lower'), ('insertion', 'higher'), ('road', 'higher'))):
        for j, k in enumerate(names):
            xs = np.arange(len(blocks)) + (j - len(names) / 2) * 0.09
            s = [r['metrics'][b][k][metric] for b in blocks]
            means = np.array([v['mean'] for v in s])
            err = np.abs(np.array([v['ci95'] for v in s]).T - means)
            ax.errorbar(xs, means, yerr=err, fmt='o' if k not in r['baselines'] else 's', ms=4, capsize=2,
                        color=colours[k], label=k)
        ax.set_xticks(range(len(blocks)), blocks)
        n = r['n_road'] if metric == 'road' else r['n_images']
        ax.set_title(f'{metric} AUC ({better} is better), {n} images, 95% CI' if metric != 'road'
                     else f'ROAD, (LeRF − MoRF) / 2 ({better} is better), {n} images, 95% CI', fontsize=9)
        ax.grid(alpha=0.3)
    axs[0, 0].legend(fontsize=7, ncol=2)
    best = r['recommended'] or blocks[-1]
    steps = np.linspace(0, 1, r['steps'] + 1)
    for ax, metric in zip(axs[1, :2], ('deletion', 'insertion')):
        for k in names:
            ax.plot(steps, r['curves'][best][k][metric], color=colours[k], label=k,
                    ls='--' if k in r['baselines'] else '-')
        ax.set_xlabel('fraction of pixels ' + ('removed (to the data mean)' if metric == 'deletion'
                                              else 'put back (onto the blurred image)'))
        ax.set_ylabel('mean probability of the explained class')
        ax.set_title(f'{metric} curves at {best}', fontsize=9)
        ax.grid(alpha=0.3)
    ax = axs[1, 2]
    for k, s in r['sanity']['randomization'][best].items():
        ax.plot(range(len(r['sanity']['cascade']) + 1), [1.] + [v['mean'] for v in s], marker='o', ms=3,
                color=colours[k], label=k, ls='--' if k in r['baselines'] else '-')
    ax.axhline(r['fails_above'], color='k', lw=0.8, ls=':')
    ax.set_xticks(range(len(r['sanity']['cascade']) + 1), ['trained', *r['sanity']['cascade']], rotation=30,
                  fontsize=7)
    ax.set_ylabel('Spearman ρ with the original map')
    ax.set_title(f'cascading randomization, head first, maps at {best}', fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f'{run_name}: do the maps show what the network used? (recommended: {best})', fontsize=11)
    return save_figure(fig, path)
