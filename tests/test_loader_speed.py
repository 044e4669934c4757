"""The array loader is far faster than a stock fastai folder loader on the same images (measured side by side)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'experiments'))
from loader_speed import images_per_second, stock_dls  # noqa: E402

from data import cifar_dls


def test_array_loader_beats_the_stock_loader(cifar10):
    dl = cifar_dls(cifar10, bs=512, device='cpu', seed=0, verbose=False).train
    # Best of three: another process busy on the same 2 cores can stall torch's threads for a moment
    # (seen: 6,500 img/s while a training job ran beside the tests, 92,000 without).
    ours = max(images_per_second(dl, 30) for _ in range(3))
    stock = images_per_second(stock_dls(cifar10, 512, 'cpu').train, 8)
    # The committed benchmark (results/loader_speed.json) shows the real ratio; this guard only has to catch a
    # return to per-item decoding, which would bring the ratio near 1, without flaking on a busy CI machine.
    assert ours > 10 * stock, (ours, stock)
