"""(Re)draw a finished run's receptive fields: receptive_field.png and .json, and their section of report.md."""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported

from fastcore.script import call_parse

from data import cifar_dls
from effective_rf import receptive_fields
from report import put_section
from run_folder import find_run, load_model


def redraw(run=None, n=256, data=None, device=None):
    "Measure a run's effective receptive fields on its own test images, and put them in its folder and report.md."
    if n < 1: raise UsageError(f'--n must be at least 1, got {n}')
    run = find_run(run)  # cams.py's: one line for a missing folder, config.json or model.pth
    config = json.loads((run / 'config.json').read_text())
    if config.get('seed') is None:
        raise UsageError(f'{run}/config.json records no seed, which draws the untrained network')
    # The run's own test images (its subset too), in the test pipeline's order, on `device`.
    dls = cifar_dls(data or config.get('data'), bs=config.get('bs', 512), subset=config.get('subset'), device=device,
                    verbose=False)
    model, _ = load_model(run, dls.device, data)
    put_section(run / 'report.md', receptive_fields(model, dls.valid, config['seed'], run, n))
    print(f'receptive_field.py: wrote receptive_field.png, receptive_field.json and report.md\'s section in {run}')
    return run


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(run: str = None,     # run folder (default: the newest under runs/)
         n: int = 256,        # test images to average the input gradients over
         data: str = None,    # CIFAR folder, if not the one the run used
         device: str = None,  # torch device (default: the GPU if there is one)
         ):
    "Measure and draw the effective receptive field of a run's trained network and of the same network untrained."
    with user_errors('receptive_field.py'): redraw(run, n, data, device)
