"""Run only fastai's lr_find on CIFAR-10, for several seeds, and record every suggestion and the rule's choice."""
import json, sys
from pathlib import Path

# the checkout is the suite: its modules first, from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
from fastcore.script import call_parse
from fastai.torch_core import set_seed

from data import cifar_dls
from report import plot_lr_find
from callbacks import plain_console
from lrfind import find_lrs
from train import cifar_learner


@call_parse
def main(data: str = None,       # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR, else download)
         bs: int = 512,          # batch size, as in training
         seeds: str = '0',       # comma-separated seeds, one finder run each
         find_iters: int = 100,  # lr_find's mock-training steps
         subset: int = None,     # class-balanced training subset
         device: str = None,     # torch device (default: the GPU if there is one)
         out: str = 'results/lr_find'):  # folder for lr_find-seed<N>.json and .png
    "The finder's four suggestions and the chosen LRMIN and LRMAX, per seed, as JSON and plots."
    with user_errors('finder.py'):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for seed in (int(s) for s in seeds.split(',')):
            set_seed(seed, reproducible=True)
            learn = cifar_learner(cifar_dls(data, bs=bs, subset=subset, device=device, seed=seed))
            plain_console(learn)
            found = find_lrs(learn, num_it=find_iters)
            res = dict(seed=seed, bs=bs, subset=subset, device=str(learn.dls.device), **found.to_json())
            (out / f'lr_find-seed{seed}.json').write_text(json.dumps(res, indent=2) + '\n')
            plot_lr_find(found, out / f'lr_find-seed{seed}.png')
            print(f'seed {seed}: {found}; {found.seconds:.0f} s', flush=True)
