"""Training-loader throughput, side by side: this suite's `cifar_dls` against a stock fastai folder loader."""
import json, os, sys, time
from pathlib import Path

# the checkout is the suite: its modules first, from any folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import quiet_warnings  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
import torch
from fastcore.script import call_parse
from fastai.vision.all import ImageDataLoaders, RandomCrop, Flip, Normalize, cifar_stats

from data import cifar_dls, resolve_path


def images_per_second(dl, n_batches, skip=1):
    "Images a second that `dl` delivers, augmentation included, over `n_batches` after `skip` warm-up batches."
    it, n = iter(dl), 0
    for _ in range(skip): next(it)
    start = time.perf_counter()
    for _, (x, _) in zip(range(n_batches), it): n += len(x)
    if x.device.type == 'cuda': torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def stock_dls(path, bs, device):
    "The loader a fastai user writes first: PIL decode and crop per item, batch `Flip` and `Normalize`."
    return ImageDataLoaders.from_folder(path, train='train', valid='test', item_tfms=RandomCrop(32), bs=bs,
                                       batch_tfms=[Flip(), Normalize.from_stats(*cifar_stats)], device=device)


def compare(path, bs=512, device='cpu', rounds=3, ours_batches=10, stock_batches=4):
    "Both loaders timed in turn, `rounds` times, best of each: a burst of load from elsewhere hits both sides alike."
    # Interleaved and best-of: on a shared machine one slow measurement of either side would swing a single ratio.
    ours, stock = cifar_dls(path, bs=bs, device=device, seed=0, verbose=False).train, stock_dls(path, bs, device).train
    times = [(images_per_second(ours, ours_batches), images_per_second(stock, stock_batches)) for _ in range(rounds)]
    best_ours, best_stock = max(o for o, _ in times), max(s for _, s in times)
    return dict(ours_images_per_second=round(best_ours), stock_images_per_second=round(best_stock),
                speedup=round(best_ours / best_stock, 1), rounds=[(round(o), round(s)) for o, s in times])


@call_parse
def main(data: str = None,     # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR, else download)
         bs: int = 512,        # batch size, as in training
         batches: int = 20,    # timed batches of the stock loader (ours times a whole epoch)
         device: str = 'cpu',  # where the batches are made and augmented
         out: str = None):     # optional JSON file for the numbers
    "Time both training loaders on the same folder, in one process, and print the speed-up."
    path, cpus = resolve_path(data), os.cpu_count()
    ours = cifar_dls(path, bs=bs, device=device, seed=0).train
    ours_ips = images_per_second(ours, len(ours) - 1)
    stock = stock_dls(path, bs, device).train
    stock_ips = images_per_second(stock, batches)
    res = dict(device=device, cpus=cpus, torch_threads=torch.get_num_threads(), bs=bs,
               stock_workers=stock.fake_l.num_workers, ours_images_per_second=round(ours_ips),
               stock_images_per_second=round(stock_ips), speedup=round(ours_ips / stock_ips, 1))
    print(f'stock fastai loader ({res["stock_workers"]} workers): {stock_ips:9,.0f} img/s')
    print(f'cifar_dls (uint8 gather + batch aug):  {ours_ips:9,.0f} img/s')
    print(f'speed-up: {res["speedup"]}x on {cpus} CPU cores, device {device}')
    if out: Path(out).write_text(json.dumps(res, indent=2) + '\n')
    return res
