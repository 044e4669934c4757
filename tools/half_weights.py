"""A run's model.pth in fp16 (13 MB, not 26): what fp16 weights cost on the test set, and the fp16 file if nothing."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import RunError, UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
import torch
from fastcore.script import call_parse, store_true

from run_folder import evaluate_run, run_data


def megabytes(state): return sum(v.numel() * v.element_size() for v in state.values()) / 1e6


@call_parse
def main(run: str,                  # run folder with model.pth (fp32)
         data: str = None,          # CIFAR folder with its test images (default: the run's own, else $CIFAR10_DIR)
         write: store_true = False, # replace model.pth with the fp16 weights, unless they cost more than --max-drop
         max_drop: float = 0.05):   # the most test accuracy, in percentage points, that fp16 weights may cost
    "Test accuracy with the run's fp32 weights and with them rounded to fp16; with --write, keep the fp16 ones."
    with user_errors('half_weights.py'):
        file = Path(run) / 'model.pth'
        if not file.is_file(): raise UsageError(f'{file} not found')
        full = torch.load(file, map_location='cpu')
        if any(v.dtype != torch.float32 for v in full.values() if v.is_floating_point()):
            raise UsageError(f'{file} is not fp32 (already converted?)')
        half = {k: v.half() if v.is_floating_point() else v for k, v in full.items()}
        if not all(torch.isfinite(v).all() for v in half.values() if v.is_floating_point()):
            raise RunError(f'{file} has values beyond fp16\'s range; keep it in fp32')
        data = run_data(Path(run), data)
        # Inference loads them into an fp32 model (load_state_dict copies): only the rounding differs.
        (l32, a32), (l16, a16) = ((m['nll'], m['test_acc']) for m in (evaluate_run(run, data, w, tta=False).metrics
                                                                     for w in (full, half)))
        print(f'fp32 weights: test accuracy {100 * a32:.2f}%, loss {l32:.4f}, {megabytes(full):.1f} MB', flush=True)
        print(f'fp16 weights: test accuracy {100 * a16:.2f}%, loss {l16:.4f}, {megabytes(half):.1f} MB', flush=True)
        drop = 100 * (a32 - a16)
        print(f'fp16 costs {drop:+.2f} percentage points of test accuracy', flush=True)
        if not write: return
        if drop > max_drop:
            raise RunError(f'fp16 weights cost {drop:.2f} points, more than --max-drop {max_drop}; kept fp32')
        torch.save(half, file)
        print(f'wrote {file} in fp16 ({file.stat().st_size / 1e6:.1f} MB)', flush=True)
