"""A finished run's final test numbers, measured again: accuracy with and without mirror TTA, and its calibration."""
import json, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, torch_device, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported

from fastcore.script import call_parse, store_true

from interpret import plot_reliability
from report import evaluation_section, put_section, save_json
from run_folder import evaluate_run, find_run, run_data
from precision import device_name

PRECISIONS = ('native', 'fp32', 'bf16')


def evaluate_folder(run=None, data=None, device='cpu', precision='native', dry_run=False):
    "Evaluate a run's model.pth on its test images; write config.json, report.md, calibration.png and mistakes.npz."
    if precision not in PRECISIONS:
        raise UsageError(f'--precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    run = find_run(run)  # cams.py's: one line for a missing folder, config.json or model.pth
    dev = torch_device(device)
    t = time.perf_counter()
    ev = evaluate_run(run, run_data(run, data), device=dev, precision=None if precision == 'native' else precision,
                      mistakes=None if dry_run else run / 'mistakes.npz')
    m = dict(ev.metrics, seconds=round(time.perf_counter() - t, 1), device_name=device_name(dev))
    if not dry_run:
        config = json.loads((run / 'config.json').read_text())
        config['test_metrics'] = m  # what run.py records at the end of a run, for runs made before it did
        save_json(run / 'config.json', config)  # atomic: a kill mid-write leaves the run's own
        plot_reliability(ev.probs, ev.targs, run / 'calibration.png')
        put_section(run / 'report.md', evaluation_section(m))
    print(f'evaluate.py: {run}: test accuracy {100 * m["test_acc"]:.2f}%, '
          f'{100 * m["test_acc_tta"]:.2f}% with mirror TTA; '
          f'ECE {100 * m["ece"]:.2f}%, NLL {m["nll"]:.4f}; {m["n_images"]:,} images in {m["precision"]} on '
          f'{m["device_name"]}, {m["seconds"]:.1f} s', flush=True)
    return m


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(run: str = None,            # run folder (default: the newest under runs/)
         data: str = None,           # CIFAR folder, if not the one the run used
         device: str = 'cpu',        # torch device
         precision: str = 'native',  # native (the run's own where this machine runs it natively, else fp32), fp32, bf16
         dry_run: store_true = False,  # print the numbers only: write nothing in the run folder
         ):
    "Measure a finished run's test accuracy with and without mirror TTA, its ECE and NLL; draw its reliability diagram."
    with user_errors('evaluate.py'):
        evaluate_folder(run, data, device, precision, dry_run)
