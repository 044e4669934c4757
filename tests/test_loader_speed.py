"""The array loader is far faster than a stock fastai folder loader on the same images (measured side by side)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'experiments'))
from loader_speed import compare  # noqa: E402

# The committed benchmark (results/loader_speed-png.log) shows the real ratio, 19.7–31.4× on a quiet machine; this
# guard only has to catch a return to per-item decoding (a ratio near 1) without flaking on a busy one. Measured
# with both cores kept busy by two other processes (and more jobs: load 8–11), 10 runs of this test gave 6.5× to
# 14.5×, 10 of 10 passed: results/cpu-checks/loader-speed-under-load.log.
GUARD = 5


def test_array_loader_beats_the_stock_loader(cifar10):
    res = compare(cifar10, rounds=3)
    print(res)  # shown with -s, as the under-load log records it
    assert res['speedup'] > GUARD, res
