"""The first-time decode of an image folder into the uint8 cache: in one process, then in one per core."""
import os, sys, tempfile, time
from pathlib import Path

# the checkout is the suite: its modules first, from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import quiet_warnings  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
from fastcore.script import call_parse

from data import load_arrays, resolve_path


@call_parse
def main(data: str = None):  # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR)
    "Time `load_arrays` with a cold cache, one worker and then every core."
    root = resolve_path(data)
    for workers in (1, os.cpu_count()):
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            load_arrays(root, cache_dir=cache, verbose=False, workers=workers)
            print(f'{workers} worker(s): decoded and cached {root} in {time.perf_counter() - t:.1f} s', flush=True)
