"""One command, one device: this suite over several seeds, against a stock fastai pipeline and a plain PyTorch loop."""
import json, os, re, shutil, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, torch_device, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
import torch
import torch.nn.functional as F
from fastcore.script import call_parse, store_true
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from fastai.vision.all import CropPad, Flip, ImageDataLoaders, Normalize, RandomCrop, cifar_stats

from arch import custom_resnet
from data import balanced_subset, resolve_path, scan_folder
from formats import find_release
from report import read_csv
from callbacks import plain_console
from rng import use_cudnn
from train import PEAK, cifar_learner, fit_assignment


# ---- 1. this suite: experiments/run.py, one process per seed -------------------------------------------------

def suite(data, seed, epochs, bs, subset, find_iters, device, out, speed=()):
    "One `run.py` training, logged to suite-seed<N>.log; its config, last metrics row and run folder."
    folder = out / 'runs' / f'seed{seed}'
    cmd = [sys.executable, str(ROOT / 'experiments' / 'run.py'), '--data', str(data), '--epochs', str(epochs),
           '--bs', str(bs), '--seed', str(seed), '--out', str(folder), '--find-iters', str(find_iters)]
    cmd += ['--subset', str(subset)] if subset else []
    cmd += ['--device', device] if device else []
    cmd += list(speed)
    with open(out / f'suite-seed{seed}.log', 'w') as log:
        if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode:
            raise UsageError(f'the suite run for seed {seed} failed; see {out / f"suite-seed{seed}.log"}')
    config = json.loads((folder / 'config.json').read_text())
    return config, read_csv(folder / 'metrics.csv'), json.loads((folder / 'lr_find.json').read_text())


def subset_folder(root, n, dest):
    "A folder of links to the same class-balanced subset that `cifar_dls(subset=n)` uses, for the baselines."
    classes, splits = scan_folder(root)
    for split, k in (('train', n), ('test', n // 5)):
        files, labels = splits[split]
        for i in balanced_subset(labels, k, len(classes)):
            link = dest / split / files[i].parent.name / files[i].name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(files[i].resolve())
    return dest


# ---- 2. stock fastai: per-item PIL decode and crop, batch Flip, fp32, default settings ----------------------

class EpochTimes(Callback):
    "Each epoch's wall time (training and validation), written to the log as it ends."
    def __init__(self, log): self.log, self.times = log, []
    def before_epoch(self): self.start = time.perf_counter()

    def after_epoch(self):
        self.times.append(time.perf_counter() - self.start)  # the Recorder has read the metrics: the device is done
        print(f'epoch {self.epoch + 1} seconds {self.times[-1]:.3f}', file=self.log, flush=True)


def stock_fastai(data, epochs, bs, lr_min, lr_max, device, log):
    "The same model and recipe from `ImageDataLoaders.from_folder`; returns (each epoch's seconds, final accuracy)."
    dls = ImageDataLoaders.from_folder(data, train='train', valid='test', bs=bs, device=device,
                                       item_tfms=[CropPad(40), RandomCrop(32)],  # pad 4 each side, crop 32
                                       batch_tfms=[Flip(), Normalize.from_stats(*cifar_stats)])
    learn = cifar_learner(dls)
    plain_console(learn)
    learn.logger = lambda row: print(row, file=log, flush=True)
    timer = EpochTimes(log)
    fit_assignment(learn, epochs, lr_min, lr_max, cbs=timer)
    return timer.times, float(learn.recorder.values[-1][-1])


# ---- 3. plain PyTorch, as the assignment's notebook: torchvision transforms, DataLoader, OneCycleLR, fp32 ------

class TVCutout:
    "Cutout as a per-image torchvision-style transform on a normalized CHW tensor: one zeroed square."
    def __init__(self, size=8): self.size = size

    def __call__(self, x):
        h, w = x.shape[-2:]
        i, j = torch.randint(0, h - self.size + 1, ()).item(), torch.randint(0, w - self.size + 1, ()).item()
        x = x.clone()
        x[:, i:i + self.size, j:j + self.size] = 0
        return x


def plain_pytorch(data, epochs, bs, lr_min, lr_max, device, log, workers=None):
    "A hand-written loop over torchvision's ImageFolder; returns (each epoch's seconds, final accuracy)."
    from torchvision import datasets, transforms as T
    norm = T.Normalize(*cifar_stats)
    train_tf = T.Compose([T.RandomCrop(32, padding=4, padding_mode='reflect'), T.RandomHorizontalFlip(), T.ToTensor(),
                          norm, TVCutout(8)])
    workers = os.cpu_count() if workers is None else workers
    train = torch.utils.data.DataLoader(datasets.ImageFolder(Path(data) / 'train', train_tf), bs, shuffle=True,
                                        drop_last=True, num_workers=workers)
    test = torch.utils.data.DataLoader(datasets.ImageFolder(Path(data) / 'test', T.Compose([T.ToTensor(), norm])),
                                       bs, num_workers=workers)
    model = custom_resnet().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr_min, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr_max, total_steps=epochs * len(train), pct_start=PEAK,
                                                div_factor=lr_max / lr_min, final_div_factor=1., cycle_momentum=False)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x) * 0.125, y)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        model.eval()
        with torch.no_grad(): correct = sum((model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in test)
        acc = correct / len(test.dataset)  # .item() above: the device is done
        times.append(time.perf_counter() - start)
        print(f'epoch {epoch + 1} seconds {times[-1]:.3f} test_acc {acc:.4f}', file=log, flush=True)
    return times, acc


def extrapolate(times, epochs):
    "A baseline's time for `epochs` from those it ran: the first (warm-up) as measured, later ones at the others' mean."
    steady = statistics.mean(times[1:]) if len(times) > 1 else times[0]
    return dict(epochs_run=len(times), epoch_seconds=[round(t, 3) for t in times], seconds_per_epoch=steady,
                warmup_seconds=times[0] - steady if len(times) > 1 else None, seconds=times[0] + steady * (epochs - 1))


def warmup(rows):
    "The suite's warm-up from one run's metrics.csv: its first epoch's seconds beyond the mean of the others."
    secs = [r['seconds'] for r in rows]
    return secs[0] - statistics.mean(secs[1:]) if len(secs) > 1 else None


# ---- the summary ---------------------------------------------------------------------------------------------

def summarize(device, runs, baselines, epochs):
    "summary.json's content: accuracy per seed, times, throughput and speed-ups."
    accs = [m[-1]['test_acc'] for _, m, _ in runs]
    train = [c['seconds']['train'] for c, _, _ in runs]
    med = statistics.median(train)
    s = dict(device=device, epochs=epochs, seeds=[c['seed'] for c, _, _ in runs], test_acc=accs,
             test_acc_mean=statistics.mean(accs), test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.,
             test_acc_min=min(accs), train_seconds=train, train_seconds_median=med,
             warmup_seconds=[warmup(m) for _, m, _ in runs],
             lr_find_seconds=[c['seconds'].get('lr_find', 0.) for c, _, _ in runs],
             lr_min=[lr['lr_min'] for _, _, lr in runs], lr_max=[lr['lr_max'] for _, _, lr in runs],
             images_per_second=runs[0][0]['n_train'] * epochs / med, baseline_seconds=baselines)
    for name, b in baselines.items(): s[f'speedup_vs_{name}'] = b['seconds'] / med
    return s


def render(s):
    "The markdown table of a summary, for results/<device>/README.md and the project README."
    pct = lambda v: f'{100 * v:.2f}%'
    setting = s.get('precision', 'fp32') + (', channels-last' if s.get('channels_last') else '')
    lines = [f"| {s['device']} | {s['epochs']} epochs, {len(s['test_acc'])} seeds, {setting} |", '|---|---|',
             f"| test accuracy, mean ± std | {pct(s['test_acc_mean'])} ± {100 * s['test_acc_std']:.2f} |",
             f"| test accuracy, min | {pct(s['test_acc_min'])} |",
             f"| training time, median | {s['train_seconds_median']:.1f} s ({s['images_per_second']:,.0f} img/s) |"]
    for name, b in s['baseline_seconds'].items():
        lines.append(f"| {name.replace('_', ' ')} | {b['seconds']:.1f} s"
                     + (f" (extrapolated from {b['epochs_run']} epochs: the first {b['epoch_seconds'][0]:.1f} s, "
                        f"then {b['seconds_per_epoch']:.1f} s each)" if b['epochs_run'] < s['epochs'] else '')
                     + f"; speed-up {s[f'speedup_vs_{name}']:.1f}× |")
    return '\n'.join(lines)


def update_readme(readme, table):
    "Replace the README's generated results block with `table`."
    text = readme.read_text()
    start, end = '<!-- results: generated by experiments/bench.py -->', '<!-- /results -->'
    if start not in text: raise UsageError(f'{readme} has no {start} block')
    readme.write_text(re.sub(f'{re.escape(start)}.*?{re.escape(end)}', f'{start}\n{table}\n{end}', text, flags=re.S))


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(data: str = None,             # CIFAR folder (default: $CIFAR10_DIR, else download)
         seeds: int = 5,               # suite runs, with seeds 0..N-1
         epochs: int = 24,             # epochs of every run
         # epochs the baselines really run (default: all; at least 2), the rest extrapolated
         baseline_epochs: int = None,
         no_baselines: store_true = False,  # the suite runs alone, without the stock fastai and plain PyTorch ones
         bs: int = 512,                # batch size of every run
         subset: int = None,           # class-balanced training subset, for a quick CPU check of the command
         find_iters: int = 100,        # lr_find's mock-training steps in the suite runs
         precision: str = 'fp32',      # the suite runs' --precision: fp32 or bf16
         channels_last: store_true = False,  # the suite runs with --channels-last
         device: str = None,           # torch device (default: the GPU if there is one)
         out: str = 'results/gpu',     # folder for summary.json, README.md and the logs
         readme: str = None):          # also write the table into this README's results block
    "Benchmark the suite against a stock fastai pipeline and a plain PyTorch loop, on one device."
    with user_errors('bench.py'):
        if seeds < 1 or epochs < 1: raise UsageError('--seeds and --epochs must be at least 1')
        b_epochs = min(baseline_epochs or epochs, epochs)
        if b_epochs < min(2, epochs):  # one epoch cannot tell the warm-up from the steady pace
            raise UsageError(f'--baseline-epochs must be at least 2, got {baseline_epochs}: the first is the warm-up')
        data, out = resolve_path(data), Path(out)
        if release := find_release(data):  # checked first: the suite runs would take minutes before the baselines fail
            raise UsageError(f'--data {data} is the CIFAR-10 {release[0]} release, and the stock fastai and '
                             'torchvision baselines read an image folder; point --data at one with train/<class>/ '
                             'and test/<class>/')
        out.mkdir(parents=True, exist_ok=True)
        dev = torch_device(device)
        name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU ({os.cpu_count()} cores)'
        speed = ['--precision', precision] + (['--channels-last'] if channels_last else [])
        runs = [suite(data, seed, epochs, bs, subset, find_iters, device, out, speed) for seed in range(seeds)]
        lr_min, lr_max = runs[0][2]['lr_min'], runs[0][2]['lr_max']
        base_data = data
        if subset and not no_baselines:
            base_data = out / 'subset-data'
            if base_data.exists(): shutil.rmtree(base_data)
            subset_folder(data, subset, base_data)
        baselines = {}
        for key, fn in () if no_baselines else (('stock_fastai', stock_fastai), ('plain_pytorch', plain_pytorch)):
            # The suite's cuDNN settings (run.py's default: benchmark search on), not set_seed's reproducible mode,
            # which would turn the search off for the baselines alone.
            set_seed(0)
            use_cudnn(deterministic=False)
            with open(out / f'{key}.log', 'w') as log:
                print(f'{key}: {b_epochs} epoch(s) of {epochs} at LRMIN {lr_min:.3g}, LRMAX {lr_max:.3g}', file=log,
                      flush=True)
                times, acc = fn(base_data, b_epochs, bs, lr_min, lr_max, dev, log)
            baselines[key] = dict(extrapolate(times, epochs), test_acc_after_epochs_run=acc)
        summary = summarize(name, runs, baselines, epochs)
        summary.update(subset=subset, precision=precision, channels_last=channels_last)
        if base_data != data: shutil.rmtree(base_data)
        (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
        table = render(summary)
        (out / 'README.md').write_text(f'# Benchmark on {name}\n\n`{" ".join(sys.argv)}`\n\n{table}\n')
        if readme: update_readme(Path(readme), table)
        print(table)
