"""What the model gets wrong: fastai's ClassificationInterpretation, the misclassified gallery, the confusion matrix."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from fastai.interpret import ClassificationInterpretation
import fastai.vision.learner  # noqa: F401  (registers plot_top_losses for image batches; without it, it raises)
from fastai.vision.core import cifar_stats
from PIL import Image
from matplotlib.figure import Figure

from report import save_figure

__all__ = ['interpret', 'top_misclassified', 'denorm', 'most_confused', 'plot_misclassified', 'plot_confusion',
           'save_test_examples', 'MISTAKES', 'kept_mistakes', 'save_mistakes', 'ECE_BINS', 'calibration_bins',
           'expected_calibration_error', 'plot_reliability']

ECE_BINS = 15  # Guo et al. 2017's equal-width bins on the top class's probability
MISTAKES = 50  # the highest-loss mistakes whose inputs a run keeps in mistakes.npz, for the app's gallery


def interpret(learn, dl=None):
    "fastai's `ClassificationInterpretation` of the test set, keeping the predictions of its single pass."
    dl = dl if dl is not None else learn.dls.valid.new(shuffle=False, drop_last=False)
    # One pass gives what from_learner, confusion_matrix and most_confused would otherwise compute three times
    # (43 s each for the test set on 2 CPU cores).
    preds, targs, decoded, losses = learn.get_preds(dl=dl, with_decoded=True, with_loss=True)
    interp = ClassificationInterpretation(learn, dl, losses)
    interp.preds, interp.targs, interp.decoded = preds, targs, decoded
    x = torch.arange(len(interp.vocab))  # fastai's own confusion-matrix formula, on the kept predictions
    interp.cm = ((decoded == x[:, None]) & (targs == x[:, None, None])).long().sum(2).numpy()
    return interp


def top_misclassified(interp, k):
    "Test-set indices of the `k` misclassified images with the highest loss, highest first."
    wrong = torch.nonzero(interp.decoded != interp.targs).flatten()
    return wrong[interp.losses[wrong].argsort(descending=True)][:k]


def denorm(x):
    "Normalized CIFAR images (N×3×H×W) back to [0, 1] RGB, as H×W×3 arrays for display."
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    return (x.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def most_confused(cm, vocab, k=10):
    "The `k` (true, predicted, count) pairs the confusion matrix `cm` counts most, off the diagonal."
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = [(vocab[i], vocab[j], int(off[i, j])) for i, j in zip(*np.nonzero(off))]
    return sorted(pairs, key=lambda p: -p[2])[:k]


def plot_misclassified(interp, path, k=25):
    "A grid of the `k` highest-loss misclassified test images, each titled true / predicted (probability)."
    idx = top_misclassified(interp, k)
    cols = min(5, max(1, len(idx)))
    rows = max(1, -(-len(idx) // cols))
    fig = Figure(figsize=(2.2 * cols, 2.5 * rows + 0.5))
    axs = np.array(fig.subplots(rows, cols, squeeze=False)).flatten()
    inps = interp[idx][0] if len(idx) else []  # fastai re-runs these through the test-time pipeline
    for ax, img, i in zip(axs, denorm(inps) if len(idx) else [], idx.tolist()):
        t, p = int(interp.targs[i]), int(interp.decoded[i])
        ax.imshow(img, interpolation='nearest')
        ax.set_title(f'true {interp.vocab[t]}\npred {interp.vocab[p]} ({interp.preds[i, p]:.2f})', fontsize=9)
    for ax in axs: ax.axis('off')
    fig.suptitle(f'{len(idx)} misclassified test images with the highest loss '
                 f'(of {int((interp.decoded != interp.targs).sum())} misclassified)')
    save_figure(fig, path)
    return idx


def plot_confusion(interp, path):
    "The confusion matrix of the test set, counts in the cells, true classes down and predictions across."
    cm, vocab = interp.cm, list(interp.vocab)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap='Blues')
    ax.set(xticks=range(len(vocab)), yticks=range(len(vocab)), xlabel='predicted', ylabel='true',
           title=f'confusion matrix (test accuracy {100 * np.trace(cm) / cm.sum():.2f}%)')
    ax.set_xticklabels(vocab, rotation=45, ha='right')
    ax.set_yticklabels(vocab)
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, cm[i, j], ha='center', va='center', fontsize=8,
                color='white' if cm[i, j] > cm.max() / 2 else 'black')
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def save_test_examples(dl, folder, n=10):
    "Save `n` images of test loader `dl` (an `ArrayDL`) as PNGs in `folder`, a class at a time; returns their paths."
    labels = dl.labels[dl.rows].cpu()
    firsts = [torch.nonzero(labels == c).flatten().tolist() for c in range(len(dl.vocab))]
    # The first image of each class, then the second of each, ...: ten examples show all ten CIFAR classes.
    picks = [f[k] for k in range(max(map(len, firsts), default=0)) for f in firsts if k < len(f)][:n]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, i in enumerate(picks):
        path = folder / f'{j + 1:02d}_{dl.vocab[int(labels[i])]}.png'
        Image.fromarray(dl.images[dl.rows[i]].cpu().permute(1, 2, 0).numpy()).save(path)  # PNG: the pixels as stored
        paths.append(path)
    return paths


def kept_mistakes(interp, k=MISTAKES):
    "What the misclassified gallery reads of `interp`, without its Learner: `(fields, idx, x)`, x its `k` worst inputs."
    idx = top_misclassified(interp, k)
    x = interp[idx][0] if len(idx) else torch.zeros(0, 3, 32, 32)  # the inputs as the test pipeline makes them
    fields = SimpleNamespace(**{f: getattr(interp, f) for f in ('vocab', 'preds', 'targs', 'decoded', 'losses')})
    return fields, idx, x


def save_mistakes(interp, file, k=MISTAKES):
    "The test set's predictions and the inputs of its `k` highest-loss mistakes, in one small file (`load_mistakes`)."
    # What the app's misclassified gallery reads, so that it needs neither the data set nor a pass over it: for
    # CIFAR-10's 10,000 test images, 630 KB.
    kept, idx, x = kept_mistakes(interp, k)
    np.savez_compressed(file, vocab=np.array([str(v) for v in kept.vocab]), preds=kept.preds.float().numpy(),
                        targs=kept.targs.numpy(), decoded=kept.decoded.numpy(),
                        losses=kept.losses.float().numpy(), idx=idx.numpy(), x=x.float().cpu().numpy())
    return file


# ---- how far the probabilities can be trusted: calibration
# (Guo et al., "On Calibration of Modern Neural Networks", 2017)

def calibration_bins(probs, targs, n_bins=ECE_BINS):
    "Per equal-width bin of the top class's probability in [0, 1]: (count, mean confidence, accuracy) as numpy arrays."
    probs, targs = torch.as_tensor(probs).float(), torch.as_tensor(targs)
    conf, pred = probs.max(1)
    # Bin b holds confidences in (b/n, (b+1)/n], as torchmetrics' MulticlassCalibrationError bins them; 0 goes to bin 0.
    b = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins).double()
    conf_sum = torch.bincount(b, weights=conf.double(), minlength=n_bins)
    right_sum = torch.bincount(b, weights=(pred == targs).double(), minlength=n_bins)
    seen = count.clamp(min=1)  # an empty bin has mean 0 and weight 0
    return count.numpy(), (conf_sum / seen).numpy(), (right_sum / seen).numpy()


def expected_calibration_error(probs, targs, n_bins=ECE_BINS):
    "ECE: the mean over all images of |accuracy − confidence| of their bin, each bin weighted by its share of images."
    return _ece(*calibration_bins(probs, targs, n_bins))


def _ece(count, conf, acc): return float((count * np.abs(acc - conf)).sum() / count.sum())


def plot_reliability(probs, targs, path, title='test set', n_bins=ECE_BINS):
    "The reliability diagram: accuracy against confidence per bin, the gap to the diagonal, and each bin's image count."
    count, conf, acc = calibration_bins(probs, targs, n_bins)
    edges = np.linspace(0, 1, n_bins + 1)
    mid, width, seen = (edges[:-1] + edges[1:]) / 2, 1 / n_bins, count > 0
    ece = _ece(count, conf, acc)
    fig = Figure(figsize=(5.5, 6.5))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=(3, 1)))
    ax.bar(mid[seen], acc[seen], width, color='tab:blue', edgecolor='white', label='accuracy of the bin')
    # The gap from each bin's accuracy to its mean confidence, hatched: above the bar, over-confident; inside, under-.
    ax.bar(mid[seen], (conf - acc)[seen], width, bottom=acc[seen], facecolor='none', edgecolor='tab:red', hatch='///',
           lw=0.8, label='gap to its mean confidence')
    ax.plot([0, 1], [0, 1], 'k--', lw=1, label='perfect calibration')
    ax.set(ylabel='accuracy', xlim=(0, 1), ylim=(0, 1), title=f'reliability, {title}: ECE {100 * ece:.2f}%')
    ax.legend(loc='upper left', fontsize=8)
    hist.bar(mid, count, width, color='grey', edgecolor='white')
    hist.set(yscale='log', xlabel=f'confidence (probability of the predicted class), {n_bins} bins', ylabel='images',
             title=f'{int(count.sum()):,} images, per bin')
    return save_figure(fig, path)
