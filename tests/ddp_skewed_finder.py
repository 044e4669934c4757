"""experiments/run.py under torchrun with rank 1's finder twice as high: shows whether rank 0's LRs reach every process.

Not a test itself: tests/test_distributed.py launches it. Each process also writes, to $LR_LOG/rank<N>.json, the batch
size its finder saw and the LRs and batch size it trained with.
"""
import json, os, runpy, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lrfind, train  # noqa: E402

RANK, LOG = int(os.environ.get('RANK', 0)), Path(os.environ['LR_LOG'])
find_lrs, fit_assignment, seen = lrfind.find_lrs, train.fit_assignment, {}


def skewed_find_lrs(learn, **kwargs):
    found = find_lrs(learn, **kwargs)
    seen['finder_bs'] = learn.dls.train.bs
    if RANK: found.lr_min, found.lr_max = 2 * found.lr_min, 2 * found.lr_max  # a finder that disagrees with rank 0's
    return found


def logged_fit(learn, epochs, lr_min, lr_max, **kwargs):
    (LOG / f'rank{RANK}.json').write_text(json.dumps(dict(seen, lr_min=lr_min, lr_max=lr_max, bs=learn.dls.train.bs)))
    return fit_assignment(learn, epochs, lr_min, lr_max, **kwargs)


# run.py imports both by name when it runs, so it gets these.
lrfind.find_lrs, train.fit_assignment = skewed_find_lrs, logged_fit
sys.argv = [str(ROOT / 'experiments' / 'run.py'), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
