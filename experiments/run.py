"""Train the assignment's custom ResNet on CIFAR-10: lr_find → LRMIN, LRMAX → 24-epoch one-cycle → a run folder."""
import json, os, platform, random, shutil, subprocess, sys, time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import RunError, UsageError, on_interrupt, quiet_warnings, torch_device, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported

import torch
import fastai, fastcore
from fastcore.script import call_parse, store_true
from fastai.torch_core import num_distrib, rank_distrib, set_seed

from arch import write_summary
from data import cifar_dls
from effective_rf import receptive_fields
from interpret import (interpret, most_confused, plot_confusion, plot_misclassified, plot_reliability, save_mistakes,
                       save_test_examples)
from report import evaluation_section, plot_curves, plot_lr_find, plot_schedule, read_csv, save_json, write_report
from callbacks import (ETA, Checkpoint, Diverged, RunLog, StopOnDivergence, load_checkpoint, plain_console, saved_epoch,
                       truncate_logs)
from lrfind import find_lrs
from predict import evaluate, export_learner
from precision import PRECISIONS, concrete_precision, device_name
from processes import broadcast, distributed, single_process
from rng import use_cudnn
from train import PEAK, cifar_learner, fit_assignment


@dataclass(frozen=True)
class Settings:
    "A run's settings, as `main` documents them: config.json stores them, and --resume reads them back."
    epochs: int = 24
    bs: int = 512
    data: str = None
    out: str = None
    seed: int = None
    subset: int = None
    lr_min: float = None
    lr_max: float = None
    device: str = None
    find_iters: int = 100
    precision: str = 'auto'
    channels_last: bool = False
    deterministic: bool = False
    tensorboard: bool = False

    def check(self):
        "Reject impossible settings before anything is created."
        if self.epochs < 1: raise UsageError(f'--epochs must be at least 1, got {self.epochs}')
        if self.bs < 1: raise UsageError(f'--bs must be at least 1, got {self.bs}')
        if self.subset is not None and self.subset < 1:
            raise UsageError(f'--subset must be positive, got {self.subset}')
        if self.find_iters < 6: raise UsageError(f'--find-iters must be at least 6, got {self.find_iters}')
        if self.precision not in PRECISIONS:
            raise UsageError(f'--precision must be one of {", ".join(PRECISIONS)}, got {self.precision!r}')
        if (self.lr_min is None) != (self.lr_max is None):
            raise UsageError('give both --lr-min and --lr-max, or neither (lr_find then picks them)')
        for name, lr in (('--lr-min', self.lr_min), ('--lr-max', self.lr_max)):
            if lr is not None and not lr > 0: raise UsageError(f'{name} must be positive, got {lr}')
        if self.lr_min is not None and self.lr_min >= self.lr_max:
            raise UsageError(f'--lr-min ({self.lr_min}) must be below --lr-max ({self.lr_max})')
        if self.tensorboard:
            try: import tensorboard_log  # noqa: F401
            except ImportError:
                raise UsageError("--tensorboard needs TensorBoard: pip install -e '.[tensorboard]'") from None
        return self

    @classmethod
    def of_run(cls, config):
        "The settings a run folder's config.json recorded; ones it predates keep their defaults."
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


def pick_device(device):
    "The torch device to train on, or a usage error that says why it can't be used."
    # one GPU per process, as torchrun numbers them
    if device is None and num_distrib() > 1 and torch.cuda.is_available():
        rank, gpus = int(os.environ.get('LOCAL_RANK', 0)), torch.cuda.device_count()
        if rank >= gpus: raise UsageError(f'process {rank} has no GPU of its own ({gpus} GPU(s) here); start at most '
                                          f'{gpus} process(es) per machine, or pass --device cpu')
        torch.cuda.set_device(rank)
        return torch.device('cuda', torch.cuda.current_device())
    return torch_device(device)


def resolve_precision(s, dev):
    "`Settings` s with --precision auto made concrete for `dev` (what --resume then reads back), and how it was chosen."
    precision, channels_last, why = concrete_precision(s.precision, s.channels_last, dev)
    s = replace(s, precision=precision, channels_last=channels_last)
    return s, (f'{"bf16 autocast" if precision == "bf16" else precision}{" + channels-last" if channels_last else ""} '
               f'({why})')


def check_out(out):
    "The run folder to create (default runs/<timestamp>), checked before any work: an existing run is not overwritten."
    out = Path(out) if out else ROOT / 'runs' / datetime.now().strftime('%Y%m%d-%H%M%S')
    if out.exists() and not out.is_dir(): raise UsageError(f'--out {out} is a file, not a folder')
    if out.is_dir() and any(out.iterdir()): raise UsageError(f'--out {out} is not empty; choose a new folder')
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK): raise UsageError(f'--out {out}: {parent} is not writable')
    return out


def git_commit():
    "The checkout's commit, with '-dirty' when it has uncommitted changes; None outside git."
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + ('-dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError): return None


def run(s):
    "A new run of `Settings` s: check them, build data and learner, find the LRs, train, and explain the result."
    s.check()
    t_start, world, main = time.perf_counter(), max(num_distrib(), 1), rank_distrib() == 0
    if s.bs % world: raise UsageError(f'--bs {s.bs} does not split evenly over {world} processes')
    dev = pick_device(s.device)
    out = check_out(s.out) if main else None  # only rank 0 writes
    s, precision = resolve_precision(s, dev)
    if main: print(f'precision: {precision}', flush=True)
    s = replace(s, seed=s.seed if s.seed is not None else random.SystemRandom().randrange(2 ** 31))
    set_seed(s.seed, reproducible=s.deterministic)
    use_cudnn(s.deterministic)
    t = time.perf_counter()
    # --bs is the global batch: each of `world` processes takes its share of every batch.
    with on_interrupt(lambda: 'interrupted while loading the data; nothing was saved'):
        dls = cifar_dls(s.data, bs=s.bs // world, subset=s.subset, device=dev, seed=s.seed, verbose=main)
    config = dict(asdict(s), precision_choice=precision, out=str(out), classes=list(dls.vocab), device=str(dev),
                  processes=world, device_name=device_name(dev),
                  versions=dict(python=platform.python_version(), torch=torch.__version__, fastai=fastai.__version__,
                                fastcore=fastcore.__version__),
                  torch_threads=torch.get_num_threads(), git_commit=git_commit(), command=' '.join(sys.argv),
                  started=datetime.now().isoformat(timespec='seconds'),
                  n_train=len(dls.train_ds), n_test=len(dls.valid_ds),
                  seconds=dict(data=round(time.perf_counter() - t, 2)))
    learn = make_learner(dls, out, s)
    # what the loss multiplies the logits by: predict.py's probabilities use it
    config['logit_scale'] = learn.loss_func.scale
    if main:
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)  # only now: a bad --data leaves nothing behind
        save_json(out / 'config.json', config)
    if main: write_summary(learn.model, out / 'summary.txt')
    finder = learn
    if world > 1 and s.lr_max is None:  # every process runs the finder alone, at the global batch size
        finder = make_learner(cifar_dls(s.data, bs=s.bs, subset=s.subset, device=dev, seed=s.seed, verbose=False),
                              out, s, model=learn.model)
    with on_interrupt(lambda: discard(out, made) if main else 'interrupted during lr_find'):
        lr = choose_lrs(finder, s, config, out, main)
    with on_interrupt(lambda: how_to_continue(out, s.epochs) if main else 'interrupted'):
        with distributed(learn):
            lr = broadcast(lr)  # rank 0's choice everywhere, whatever tiny differences the processes' finders had
            fit_run(learn, s.epochs, config, lr, out, main)
        if main:
            with single_process(): return finish(learn, config, lr, out, t_start)


def discard(out, made):
    "After a Ctrl-C in lr_find: a run folder with nothing to resume goes (one the user made is emptied), and says so."
    if made: shutil.rmtree(out, ignore_errors=True)
    else:
        for p in out.iterdir(): shutil.rmtree(p) if p.is_dir() else p.unlink()
    return f'interrupted during lr_find; there is nothing to resume, so {out} was {"removed" if made else "emptied"}'


def how_to_continue(out, epochs):
    "After a Ctrl-C in training: what is kept, and the command that continues the run."
    ck = out / 'checkpoint.pth'
    if (out / 'model.pth').exists(): return f'interrupted after the run had finished; everything is in {out}'
    done = saved_epoch(ck)
    if done == epochs: kept = f'interrupted while writing the figures; all {epochs} epochs are saved in {ck}'
    elif done: kept = f'interrupted during epoch {done + 1} of {epochs}; epochs 1-{done} are saved in {ck}'
    else: kept = (f'interrupted during epoch 1 of {epochs}, before any epoch was saved; '
                  f'the LRs are in {out / "lr_find.json"}')
    return f'{kept}; continue with: python experiments/run.py --resume {_shown(out)}'


def _shown(path):
    "`path` as the user can type it from here: relative to the working folder when it lies inside it."
    rel = os.path.relpath(path)
    return rel if not rel.startswith('..') else str(path)


def resume_run(folder, device=None):
    "Continue a killed run from its last saved epoch: same flags, seed and LRs (no new lr_find) on `device` or its own."
    folder = Path(folder)
    if not folder.is_dir(): raise UsageError(f'--resume {folder}: no such run folder')
    if not (folder / 'config.json').exists(): raise UsageError(f'--resume {folder}: not a run folder (no config.json)')
    if (folder / 'model.pth').exists(): raise UsageError(f'--resume {folder}: that run has already finished')
    if not (folder / 'checkpoint.pth').exists() and not (folder / 'lr_find.json').exists():
        raise UsageError(f'--resume {folder}: the run stopped before its LRs were chosen, '
                         'so there is nothing to resume; start it again')
    t_start, world, main = time.perf_counter(), max(num_distrib(), 1), rank_distrib() == 0
    config = json.loads((folder / 'config.json').read_text())
    if world != config.get('processes', 1):
        raise UsageError(f'--resume {folder}: the run used {config.get("processes", 1)} process(es); '
                         'resume it with as many')
    lr, s = json.loads((folder / 'lr_find.json').read_text()), Settings.of_run(config)
    if device is None and world == 1 and config['device'].startswith('cuda') and not torch.cuda.is_available():
        raise UsageError(f'--resume {folder}: the run trained on {config["device"]}, and this machine has no CUDA GPU; '
                         'add --device cpu to continue it here')
    dev = pick_device(device if device is not None or world > 1 else config['device'])
    # Seeded as run() seeds: a run stopped before its first checkpoint starts again exactly as it first did (the
    # finder rewinds every random stream, so skipping it changes nothing); a checkpoint's own streams replace these.
    set_seed(s.seed, reproducible=s.deterministic)
    use_cudnn(s.deterministic)
    dls = cifar_dls(s.data, bs=s.bs // world, subset=s.subset, device=dev, seed=s.seed, verbose=main)
    learn = make_learner(dls, folder, s)
    ck = folder / 'checkpoint.pth'
    state = load_checkpoint(learn, ck) if ck.exists() else None
    done = state['epoch'] if state else 0
    if main:
        truncate_logs(folder, done, len(dls.train))
        print(f'resuming {folder} after epoch {done} of {config["epochs"]}', flush=True)
        config.setdefault('resumed', []).append(dict(after_epoch=done, at=datetime.now().isoformat(timespec='seconds')))
    with on_interrupt(lambda: how_to_continue(folder, s.epochs) if main else 'interrupted'):
        with distributed(learn): fit_run(learn, s.epochs, config, lr, folder, main, resumed=state)
        if main:
            with single_process(): return finish(learn, config, lr, folder, t_start)


def make_learner(dls, out, s, model=None):
    "The learner for `Settings` s, with fastai's bars on a terminal and only its epoch table in a log."
    learn = cifar_learner(dls, model=model, path=out or '.', precision=s.precision, channels_last=s.channels_last)
    if not sys.stdout.isatty(): plain_console(learn)
    return learn


def choose_lrs(learn, s, config, out, main=True):
    "LRMIN, LRMAX: the finder's, or the settings' if both are given; the `main` process saves lr_find.json (and .png)."
    if s.lr_max is not None:
        lr = dict(suggestions=None, lr_min=s.lr_min, lr_max=s.lr_max, rule='given on the command line')
    else:
        if main: print(f'lr_find: {s.find_iters} mock-training steps ...', flush=True)
        with single_process(): found = find_lrs(learn, num_it=s.find_iters)  # each process on its own
        config['seconds']['lr_find'] = round(found.seconds, 2)
        lr = found.to_json()
        if main:
            plot_lr_find(found, out / 'lr_find.png')
            print(f'lr_find: {found}', flush=True)
    if main: save_json(out / 'lr_find.json', lr)
    return lr


def fit_run(learn, epochs, config, lr, out, main=True, resumed=None):
    "The one-cycle fit (from the checkpoint `resumed`, if given); the `main` process logs and checkpoints every epoch."
    start_epoch = resumed['epoch'] if resumed else 0
    cbs = [StopOnDivergence()]
    if main:
        cbs += [RunLog(out), Checkpoint(out / 'checkpoint.pth', resumed, lr=lr)]
        if learn.dls.device.type == 'cpu': cbs.append(ETA())
        if config.get('tensorboard'):
            from tensorboard_log import SUBDIR, TensorBoardLog
            cbs.append(TensorBoardLog(out / SUBDIR))
        # Training time is this fit's wall time, plus the logged epochs before it when resuming.
        prior = sum(r['seconds'] for r in read_csv(out / 'metrics.csv')) if start_epoch else 0.
    t = time.perf_counter()
    try: fit_assignment(learn, epochs, lr['lr_min'], lr['lr_max'], cbs=cbs, start_epoch=start_epoch)
    except Diverged as e:
        ck = out / 'checkpoint.pth' if out else None
        kept = (f'the last good checkpoint (epoch {saved_epoch(ck)}) is {ck}'
                if ck and ck.exists() else 'no epoch had finished')
        raise RunError(f'{e.msg} (it was {lr["lr_max"]:.3g}); {kept}') from None
    if main: config['seconds']['train'] = round(prior + time.perf_counter() - t, 2)


def finish(learn, config, lr, out, t_start):
    "Rank 0, after training: the figures, config.json and report.md, then the model."
    pairs = explain(learn, config, lr, out)
    t = time.perf_counter()
    ev = evaluate(learn)  # the test set with and without mirror TTA, and how well calibrated its probabilities are
    config['test_metrics'] = dict(ev.metrics, precision=config['precision'])
    plot_reliability(ev.probs, ev.targs, out / 'calibration.png')
    config['seconds']['evaluate'] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    fields = receptive_fields(learn.model, learn.dls.valid, config['seed'], out)  # 256 test images, or all there are
    config['seconds']['receptive_field'] = round(time.perf_counter() - t, 2)
    config['seconds']['total'] = round(time.perf_counter() - t_start, 2)  # of this process, when resumed
    save_json(out / 'config.json', config)
    write_report(out, config, lr, [mistakes_section(pairs), evaluation_section(config['test_metrics']), fields])
    save_test_examples(learn.dls.valid, out / 'examples', n=10)  # app.py's examples: it starts without the data set
    if config.get('tensorboard'):
        from tensorboard_log import log_figures
        log_figures(out)
    # fastai's way to share it: `load_learner(out/'export.pkl').predict(image)`, with no training images inside.
    export_learner(learn.model, list(learn.dls.vocab), out / 'export.pkl', device=learn.dls.device,
                   logit_scale=learn.loss_func.scale)
    # Last, since model.pth marks a finished run: stopped before it, --resume draws the figures again.
    torch.save({k: v.cpu() for k, v in learn.model.state_dict().items()}, out / 'model.pth')
    (out / 'checkpoint.pth').unlink(missing_ok=True)  # model.pth holds the weights now
    last, m = read_csv(out / 'metrics.csv')[-1], config['test_metrics']
    print(f'test accuracy {100 * last["test_acc"]:.2f}% after {config["epochs"]} epochs '
          f'({100 * m["test_acc_tta"]:.2f}% with mirror TTA; calibration error {100 * m["ece"]:.2f}%); '
          f'run folder {out}')
    return out


def explain(learn, config, lr, out):
    "The schedule, the curves, the misclassified gallery and the confusion matrix; returns the most-confused pairs."
    plot_schedule(read_csv(out / 'schedule.csv'), out / 'schedule.png', lr['lr_min'], lr['lr_max'],
                  PEAK * config['epochs'])
    plot_curves(read_csv(out / 'metrics.csv'), out / 'curves.png')
    interp = interpret(learn)
    save_mistakes(interp, out / 'mistakes.npz')  # the app's misclassified gallery, with no data set
    plot_misclassified(interp, out / 'misclassified.png')
    plot_confusion(interp, out / 'confusion.png')
    return most_confused(interp.cm, list(interp.vocab))


def mistakes_section(pairs):
    "report.md's section on what the model gets wrong."
    lines = ['## Mistakes', '', 'The misclassified test images with the highest loss, then the confusion matrix. '
             'Grad-CAM of the same mistakes: `python cams.py --n 10 --run <this folder>`.', '',
             '![misclassified](misclassified.png)', '', '![confusion](confusion.png)', '',
             '| true | predicted as | times |', '|---|---|---|']
    return '\n'.join(lines + [f'| {t} | {p} | {n} |' for t, p, n in pairs])


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(epochs: int = 24,       # training epochs; the LR peaks after 5/24 of them
         bs: int = 512,          # batch size
         data: str = None,       # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR, else download)
         out: str = None,        # run folder (default: runs/<timestamp>)
         seed: int = None,       # random seed (default: drawn at random and recorded in config.json)
         subset: int = None,     # train on N class-balanced images and test on N//5, for quick CPU runs
         lr_min: float = None,   # LRMIN, the schedule's start and end; with --lr-max it skips the finder
         lr_max: float = None,   # LRMAX, the schedule's peak
         device: str = None,     # torch device, e.g. cuda, cuda:1, cpu (default: the GPU if there is one)
         find_iters: int = 100,  # lr_find's mock-training steps
         # auto (bf16 + channels-last on bf16 GPUs and AMX / AVX-512 BF16 CPUs, else fp32), fp32, bf16
         precision: str = 'auto',
         channels_last: store_true = False,  # channels-last memory layout (faster convolutions; auto adds it with bf16)
         deterministic: store_true = False,  # repeatable GPU runs: fixed cuDNN algorithms, no benchmark search
         # also log to runs/<stamp>/tensorboard: watch with `tensorboard --logdir runs`
         tensorboard: store_true = False,
         # a killed run's folder: continue it from its last finished epoch (with --device: there)
         resume: str = None,
         ):
    "Train the custom ResNet on CIFAR-10 with lr_find and the assignment's one-cycle, and explain it in a run folder."
    with user_errors('run.py'):
        if resume: return resume_run(resume, device)  # --device moves a run to another device, e.g. a GPU run to a CPU
        return run(Settings(epochs, bs, data, out, seed, subset, lr_min, lr_max, device, find_iters, precision,
                            channels_last, deterministic, tensorboard))
