"""Where one epoch's time goes: host time against device time per batch, and the top operations, from torch.profiler."""
import json, shutil, statistics, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, torch_device, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function
from fastcore.script import call_parse, store_true
from fastai.callback.core import Callback
from fastai.callback.training import ShortEpochCallback
from fastai.torch_core import set_seed

from data import cifar_dls
from callbacks import Checkpoint, RunLog, StopOnDivergence, plain_console
from precision import PRECISIONS
from train import cifar_learner, fit_assignment


class PhaseClock(Callback):
    "Host seconds between training batches (no sync), and each phase's wall time with the device drained at both ends."
    order = 100  # after every other callback of the batch and the epoch (the Checkpoint's save included)

    def __init__(self, annotate=False): self.annotate = annotate  # mark the phases for the profiler's trace

    def _sync(self):
        if self.dls.device.type == 'cuda': torch.cuda.synchronize(self.dls.device)

    def before_fit(self): self.gaps, self.phases, self.ranges = [], {}, {}

    def before_epoch(self): self._sync(); self.epoch_t0 = time.perf_counter()

    def after_epoch(self): self._sync(); self.epoch_wall = time.perf_counter() - self.epoch_t0

    def before_train(self): self._begin('train')
    def after_train(self): self._end('train')
    def before_validate(self): self._begin('valid')
    def after_validate(self): self._end('valid')

    def after_batch(self):
        now = time.perf_counter()
        if self.training: self.gaps.append(now - self.last)
        self.last, self.n = now, self.n + 1

    def _begin(self, name):
        self._sync()
        if self.annotate:
            self.ranges[name] = record_function(f'phase:{name}')
            self.ranges[name].__enter__()
        self.t0 = self.last = time.perf_counter()
        self.n = 0

    def _end(self, name):
        host = self.last - self.t0  # until the phase's last batch was handed over, before waiting for the device
        self._sync()
        self.phases[name] = dict(batches=self.n, host_s=host, wall_s=time.perf_counter() - self.t0)
        if self.annotate: self.ranges.pop(name).__exit__(None, None, None)


def busy_us(intervals):
    "Microseconds covered by a set of (start, end) intervals, overlaps counted once."
    total, end = 0., float('-inf')
    for s, e in sorted(intervals):
        if e <= end: continue
        total += e - max(s, end)
        end = e
    return total


def device_busy(events):
    "Device busy time (µs) in each marked phase and in all (kernels, copies, sets), from the profiler's device events."
    dev = [(e.time_range.start, e.time_range.end) for e in events
           if e.device_type != DeviceType.CPU and not getattr(e, 'is_user_annotation', False)]
    if not dev: return None  # a CPU profile: no device timeline
    out = dict(all=busy_us(dev))
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith('phase:'):
            s, t = e.time_range.start, e.time_range.end
            out[e.name[6:]] = busy_us([(a, b) for a, b in dev if s <= a < t])
    return out


def per_batch(clock, busy=None):
    "Milliseconds per batch of each phase: host, wall, and device busy time when the profile has a device timeline."
    res = {}
    for name, p in clock.phases.items():
        n = max(p['batches'], 1)
        res[name] = dict(batches=p['batches'], host_ms=1e3 * p['host_s'] / n, wall_ms=1e3 * p['wall_s'] / n,
                         device_ms=busy[name] / 1e3 / n if busy and name in busy else None)
    gaps = [1e3 * g for g in clock.gaps]
    if gaps: res['train'].update(host_ms_median=statistics.median(gaps), host_ms_max=max(gaps))
    return res


def top_ops(prof, n, on_device):
    "The `n` operations with the most self time (the device's, else the host's), as rows and as torch's table."
    key = 'self_device_time_total' if on_device else 'self_cpu_time_total'
    # Without our phase markers: on a GPU their device-side copy spans the whole phase and would head the table.
    avgs = EventList([a for a in prof.key_averages() if not a.key.startswith('phase:')],
                     use_device='cuda' if on_device else None)
    rows = sorted(avgs, key=lambda a: getattr(a, key), reverse=True)[:n]
    table = avgs.table(sort_by=key, row_limit=n, max_name_column_width=60)
    return [dict(name=a.key, calls=a.count, self_device_ms=a.self_device_time_total / 1e3,
                 self_cpu_ms=a.self_cpu_time_total / 1e3) for a in rows], table


def report(s):
    "profile.txt's summary lines, above torch's table."
    lines = [f"{s['device_name']}: {s['precision']}{', channels-last' if s['channels_last'] else ''}, batch {s['bs']}, "
             f"{s['n_train']:,} training images",
             'ms per batch: host = CPU time from one batch to the next (no sync); wall = with the device drained; '
             'device = busy time of kernels and copies (profiled epoch only)']
    for label, ph in (('unprofiled epoch', s['unprofiled']), ('profiled epoch', s['profiled'])):
        for name, p in ph['phases'].items():
            dev = f"{p['device_ms']:7.2f}" if p['device_ms'] is not None else '    n/a'
            lines.append(f"  {label:16} {name:5} {p['batches']:4} batches  host {p['host_ms']:7.2f}  "
                         f"wall {p['wall_ms']:7.2f}  device {dev}")
        lines.append(f"  {label:16} epoch wall {ph['epoch_wall_s']:.2f} s")
    train = s['profiled']['phases']['train']
    if train['device_ms'] is not None:
        lines.append(f"training: the device was busy {100 * train['device_ms'] / train['wall_ms']:.0f}% of the "
                     'wall time (near 100%: the GPU sets the pace; far below: the host, Python and fastai, does)')
    return '\n'.join(lines)


def timed_epoch(learn, lrs, annotate=False):
    "One epoch of the assignment's one-cycle with `PhaseClock`; returns the clock."
    clock = PhaseClock(annotate)
    fit_assignment(learn, 1, *lrs, cbs=[clock])
    return clock


def profile_epochs(dls, folder, precision, channels_last, warmup, lrs):
    "A warm-up segment, then one timed epoch and one profiled epoch of a run.py learner; both clocks and the profile."
    learn = cifar_learner(dls, path=folder, precision=precision, channels_last=channels_last)
    plain_console(learn)
    # The callbacks run.py trains with, so the epoch costs what a run's does (the checkpoint's save included).
    learn.add_cbs([StopOnDivergence(), RunLog(folder), Checkpoint(folder / 'checkpoint.pth')])
    fit_assignment(learn, 1, *lrs, cbs=[ShortEpochCallback(warmup)])
    plain = timed_epoch(learn, lrs)  # without the profiler's own host cost
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dls.device.type == 'cuda' else [])
    with profile(activities=acts) as prof: profiled = timed_epoch(learn, lrs, annotate=True)
    return plain, profiled, prof


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(data: str = None,         # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR, else download)
         bs: int = 512,            # batch size, as run.py
         subset: int = None,       # class-balanced training subset, for a quick CPU rehearsal
         precision: str = 'fp32',  # fp32 or bf16, as run.py's --precision
         channels_last: store_true = False,  # as run.py's --channels-last
         device: str = None,       # torch device (default: the GPU if there is one)
         warmup: float = 0.3,      # fraction of an epoch trained first (cuDNN's search, the allocator), not timed
         lr_min: float = 0.004,    # the one-cycle's LRMIN and LRMAX: the time does not depend on them,
         lr_max: float = 0.4,      #   so no finder is run
         top: int = 20,            # operations in the table
         seed: int = 0,            # random seed
         out: str = 'results/gpu/profile'):  # folder for profile.txt and profile.json
    "Train a warm-up segment, time one epoch, then profile one: host against device time per batch, and the top ops."
    with user_errors('profile_epoch.py'):
        if bs < 1 or top < 1: raise UsageError('--bs and --top must be at least 1')
        if not 0 < warmup <= 1: raise UsageError(f'--warmup is a fraction of an epoch in (0, 1], got {warmup}')
        if precision not in PRECISIONS:
            raise UsageError(f'--precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        if not 0 < lr_min < lr_max: raise UsageError(f'need 0 < --lr-min < --lr-max, got {lr_min} and {lr_max}')
        out = Path(out)
        if out.exists() and not out.is_dir(): raise UsageError(f'--out {out} is a file, not a folder')
        dev = torch_device(device)
        set_seed(seed)
        torch.backends.cudnn.benchmark = True  # run.py's default (`use_cudnn`)
        dls = cifar_dls(data, bs=bs, subset=subset, device=dev, seed=seed)
        tmp = Path(tempfile.mkdtemp(prefix='profile-epoch-'))  # the run's logs and checkpoint, thrown away
        try: plain, profiled, prof = profile_epochs(dls, tmp, precision, channels_last, warmup, (lr_min, lr_max))
        finally: shutil.rmtree(tmp, ignore_errors=True)
        busy = device_busy(prof.events())
        ops, table = top_ops(prof, top, busy is not None)
        s = dict(device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU',
                 torch=torch.__version__, precision=precision, channels_last=channels_last, bs=bs,
                 n_train=len(dls.train_ds), warmup_fraction=warmup,
                 unprofiled=dict(phases=per_batch(plain), epoch_wall_s=plain.epoch_wall),
                 profiled=dict(phases=per_batch(profiled, busy), epoch_wall_s=profiled.epoch_wall,
                               device_busy_s=busy['all'] / 1e6 if busy else None),
                 top_ops=ops, command=' '.join(sys.argv))
        out.mkdir(parents=True, exist_ok=True)
        (out / 'profile.json').write_text(json.dumps(s, indent=2) + '\n')
        head = report(s)
        sort = 'self device time' if busy else 'self CPU time (no device timeline)'
        (out / 'profile.txt').write_text(f'`{s["command"]}`\n\n{head}\n\nTop {top} operations by {sort}, '
                                         f'profiled epoch:\n{table}\n')
        print(head)
        return s
