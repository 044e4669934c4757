"""What reads a run folder: finds it, loads its model, class names, test images and kept mistakes, evaluates it."""
import json, pickle, zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from arch import custom_resnet
from cli import UsageError, torch_device
from data import DataError, cifar_dls, resolve_path, scan_folder
from interpret import interpret, save_mistakes
from predict import CIFAR10_CLASSES, evaluate, native_precision
from train import cifar_learner

__all__ = ['find_run', 'run_data', 'run_classes', 'load_model', 'load_run', 'load_mistakes', 'evaluate_run']

ROOT = Path(__file__).resolve().parent


def find_run(run):
    "The run folder to explain: `run`, or the newest folder under runs/ with a model."
    if run is None:
        runs = sorted((p for p in (ROOT / 'runs').glob('*') if (p / 'model.pth').exists()),
                      key=lambda p: p.stat().st_mtime)
        if not runs: raise UsageError(f'no finished runs under {ROOT / "runs"}; train one first, or pass --run DIR')
        return runs[-1]
    run = Path(run)
    if not run.is_dir():
        raise UsageError(f'--run {run} does not exist' if not run.exists() else f'--run {run} is not a folder')
    for f in ('config.json', 'model.pth'):
        if not (run / f).exists(): raise UsageError(f'run folder {run} has no {f}; did its training finish?')
    return run


def run_data(run, data=None):
    "A run's CIFAR test-image folder: `data`, else the run's own if it is still there, else $CIFAR10_DIR or a download."
    if data: return data
    recorded = json.loads((Path(run) / 'config.json').read_text()).get('data')
    # A run copied to another machine (a Space, say) has lost its folder; fastai's download then gets CIFAR-10.
    return recorded if recorded and Path(recorded).is_dir() else resolve_path()


def run_classes(run, n_out, data=None):
    "A run folder's class names: its config.json's, else its data folder's, else CIFAR-10's for a 10-output model."
    config = json.loads((Path(run) / 'config.json').read_text())
    if config.get('classes'): return list(config['classes'])
    # Runs made before config.json recorded `classes`: the folder names are the classes, with no image decoded.
    folder = data or config.get('data')  # never $CIFAR10_DIR or a download: another folder may hold other classes
    if folder:
        try: classes = scan_folder(Path(folder))[0]
        except DataError: classes = None
        if classes and len(classes) == n_out: return classes
    if n_out == len(CIFAR10_CLASSES): return list(CIFAR10_CLASSES)
    raise UsageError(f'{run}/config.json records no class names, and no {n_out}-class data folder was found at '
                     f'{folder}; pass --data DIR, the folder the run trained on')


def load_model(run, device=None, data=None):
    "A run's trained `custom_resnet` (on `device`, default the GPU if any, with its `logit_scale`) and its class names."
    run, file = Path(run), Path(run) / 'model.pth'
    dev = torch_device(device)
    try:
        state = torch.load(file, map_location='cpu')
        model = custom_resnet(state['head.fc.weight'].shape[0])  # as many outputs as the run had classes
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f'{file} is not a custom_resnet state_dict ({reason})') from None
    # The scale its loss put on the logits, for `predict`'s probabilities; runs before config.json recorded it
    # used 0.125.
    model.logit_scale = json.loads((run / 'config.json').read_text()).get('logit_scale', 0.125)
    return model.to(dev).eval(), run_classes(run, model.head.fc.out_features, data)


def load_run(run, data=None, device=None, bs=None):
    "A Learner with the run's trained weights, over the run's own test images (in batches of `bs`, default the run's)."
    config = json.loads((run / 'config.json').read_text())
    dls = cifar_dls(data or config.get('data'), bs=bs or config.get('bs', 512), subset=config.get('subset'),
                    device=device, verbose=False)
    model, _ = load_model(run, dls.device, data)  # with its one-line errors
    if model.head.fc.out_features != len(dls.vocab):
        raise UsageError(f'{run / "model.pth"} has {model.head.fc.out_features} classes, its data {len(dls.vocab)}')
    learn = cifar_learner(dls, model, logit_scale=model.logit_scale)  # the run's probabilities, as it trained them
    learn.remove_cb(learn.progress)  # a few seconds of prediction need no bar
    return learn


def load_mistakes(run):
    "A run's mistakes.npz as `(interp, x)`: the fields of its Interpretation the gallery reads, and the worst inputs."
    # `interpret.save_mistakes` wrote it at the end of the run; None for a run made before it did.
    file = Path(run) / 'mistakes.npz'
    if not file.exists(): return None
    try:
        with np.load(file, allow_pickle=False) as f: a = {k: f[k] for k in f.files}
        interp = SimpleNamespace(vocab=[str(v) for v in a['vocab']], preds=torch.from_numpy(a['preds']),
                                 targs=torch.from_numpy(a['targs']), decoded=torch.from_numpy(a['decoded']),
                                 losses=torch.from_numpy(a['losses']))
        return interp, torch.from_numpy(a['x'])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f'{file} is not a mistakes file ({reason})') from None


def evaluate_run(run, data, state=None, device='cpu', precision=None, bs=None, tta=True, mistakes=None):
    "A run's `Evaluation` on all its test images in `data`: plain accuracy is its last epoch's; `state`: other weights."
    # fastai's `get_preds`, with the run's subset and memory layout, and its precision where it is native here
    # (`native_precision`; `precision` overrides): the numbers of its metrics.csv, so that a shipped model.pth can be
    # checked against them. In eval mode each image's answer does not depend on its batch, so `bs` changes only speed.
    run = Path(run)
    config = json.loads((run / 'config.json').read_text())
    dls = cifar_dls(data, bs=bs or config.get('bs', 512), subset=config.get('subset'), device=device, verbose=False)
    model, _ = load_model(run, dls.device, data)
    if state is not None: model.load_state_dict(state)
    precision = precision or native_precision(config.get('precision', 'fp32'), dls.device)
    own = precision == config.get('precision', 'fp32')  # the run's layout with its own precision
    learn = cifar_learner(dls, model, logit_scale=model.logit_scale, precision=precision,
                          channels_last=own and config.get('channels_last', False))
    ev = evaluate(learn, tta=tta)
    ev.metrics['precision'] = precision
    # `mistakes`: also write the app's gallery file there, as run.py does at the end of a run (one more pass).
    if mistakes:
        with learn.no_bar(): save_mistakes(interpret(learn), mistakes)
    return ev
