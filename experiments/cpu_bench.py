"""The CPU speed table: training images/s of plain PyTorch loops and this suite, and the 24-epoch times they project."""
import json, shutil, sys, tempfile, time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
import torch
import torch.nn.functional as F
from fastcore.script import call_parse, store_true
from fastai.callback.core import Callback
from fastai.torch_core import set_seed
from torch.profiler import ProfilerActivity, profile

from arch import custom_resnet
from callbacks import RunLog, StopOnDivergence
from data import cifar_dls
from precision import auto_precision, device_name
from train import cifar_learner, fit_assignment

N_TRAIN, N_TEST, EPOCHS = 50_000, 10_000, 24  # the full job's training and test images, and its epochs


def timed(step, n, warmup):
    "Mean seconds of `step()` over `n` calls, after `warmup` calls that are not counted (oneDNN builds its kernels)."
    for _ in range(warmup): step()
    t = time.perf_counter()
    for _ in range(n): step()
    return (time.perf_counter() - t) / n


# ---- 1. plain PyTorch: the model alone, on one random batch, no data pipeline and no fastai -------------------------

def plain_loop(bf16, channels_last, bs, steps, warmup, compiled=False):
    "(seconds a train step, seconds a forward-only test batch) of a bare PyTorch loop: SGD, Nesterov, as the suite's."
    torch.manual_seed(0)
    model, x, y = custom_resnet(), torch.randn(bs, 3, 32, 32), torch.randint(0, 10, (bs,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net = torch.compile(model) if compiled else model
    cast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)

    def train_step():
        with cast(): loss = F.cross_entropy(net(x) * 0.125, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def test_step():
        with torch.no_grad(), cast(): net(x)

    model.train()
    train = timed(train_step, steps, warmup)
    model.eval()
    return train, timed(test_step, steps, warmup)


# ---- 2. this suite: fastai's Learner from train.cifar_learner, the real data and augmentations ----------------------

class StepClock(Callback):
    "Wall time of each training batch, from the end of the one before (fastai's whole step: batch, augmentation, "
    "forward, backward, optimizer, callbacks), and of the test pass."
    order = 100  # after every other callback of the batch

    def before_fit(self): self.steps, self.valid = [], None
    def before_train(self): self.last = time.perf_counter()

    def after_batch(self):
        if not self.training: return
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now

    def before_validate(self): self.t0 = time.perf_counter()
    def after_validate(self): self.valid = time.perf_counter() - self.t0


def suite(data, precision, bs, steps, warmup, folder, profiled=False):
    "(seconds a training step, seconds a test image, profiler or None) of one epoch of `warmup + steps` batches."
    set_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    # --subset: `warmup + steps` full batches of class-balanced training images, and a fifth as many test images.
    dls = cifar_dls(data, bs=bs, subset=bs * (warmup + steps), device='cpu', seed=0, verbose=False)
    learn = cifar_learner(dls, path=folder, precision=precision)
    clock = StepClock()
    with learn.no_logging(), learn.no_bar():
        # The run's own per-batch callbacks (the divergence check, the step log): their cost is the suite's.
        cbs = [StopOnDivergence(), RunLog(folder), clock]
        prof = profile(activities=[ProfilerActivity.CPU]) if profiled else nullcontext()
        with prof: fit_assignment(learn, 1, 1e-3, 0.1, cbs=cbs)
    return sum(clock.steps[warmup:]) / steps, clock.valid / len(dls.valid_ds), prof if profiled else None


def projected(train_step, test_image, bs):
    "Seconds of the full job's 24 epochs: every training batch of 50,000 images and a test pass of 10,000 a epoch."
    return EPOCHS * ((N_TRAIN // bs) * train_step + N_TEST * test_image)


# ---- 3. where the time goes: each convolution against this CPU's own matrix-multiply rate ---------------------------

CONVS = [(3, 64, 32), (64, 128, 32), (128, 128, 16), (128, 256, 16), (256, 512, 8), (512, 512, 4)]  # c_in, c_out, size


def conv_rates(bs, bf16, reps=3):
    "GFLOP/s of each distinct convolution's forward, input-gradient and weight-gradient passes, channels-last."
    dtype, rows = torch.bfloat16 if bf16 else torch.float32, []
    for c_in, c_out, size in CONVS:
        x = torch.randn(bs, c_in, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
        g = torch.randn(bs, c_out, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        flop = 2 * bs * c_out * c_in * 9 * size * size  # one pass: a multiply and an add per weight per output pixel
        fwd = timed(lambda: F.conv2d(x, w, padding=1), reps, 1)
        grads = lambda mask: torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                                 1, mask)
        bwd_x, bwd_w = (timed(lambda: grads([True, False, False]), reps, 1),
                        timed(lambda: grads([False, True, False]), reps, 1))
        rows.append(dict(conv=f'{c_in}->{c_out} at {size}x{size}', gflop=flop / 1e9,
                         **{k: flop / s / 1e9 for k, s in (('fwd', fwd), ('bwd_input', bwd_x), ('bwd_weight', bwd_w))}))
    return rows


def matmul_rate(bf16, n=4096, reps=3):
    "GFLOP/s of an n×n matrix multiply: about the most this CPU's vector units give, in that precision."
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, reps, 1) / 1e9


# ---- the table ------------------------------------------------------------------------------------------------------

def table(rows, bs):
    "The side-by-side table, with each row's speed against the plain bf16 loop's."
    base = next((r for r in rows if r['name'] == 'plain PyTorch, bf16 + channels-last'), None)
    lines = [f'{"":46} {"train img/s":>11} {"s/step":>7} {"test img/s":>10} {"24 epochs":>10} {"vs plain bf16":>13}']
    for r in rows:
        vs = f'{r["img_s"] / base["img_s"]:.2f}x' if base else ''
        lines.append(f'{r["name"]:46} {r["img_s"]:11.1f} {r["step_s"]:7.2f} {r["test_img_s"]:10.1f} '
                     f'{r["epochs24_s"] / 60:7.1f} min {vs:>13}')
    return '\n'.join(lines + [f'(batch {bs}; 24 epochs = {N_TRAIN // bs} training batches and {N_TEST:,} test images '
                              'each, without lr_find and figures)'])


@call_parse
def main(data: str = None,        # CIFAR folder with train/ and test/ (default: $CIFAR10_DIR)
         bs: int = 512,           # batch size, the recipe's
         steps: int = 5,          # timed training steps per row
         warmup: int = 2,         # steps before them, not timed (oneDNN builds its kernels in the first)
         compile: store_true = False,  # add a row for the plain bf16 loop under torch.compile (needs a C compiler)
         # also print the top operations of the suite's default and each conv's GFLOP/s
         profile_ops: store_true = False,
         out: str = None,         # also write the numbers as JSON here
         ):
    "Training images/s at batch `bs` on this CPU: plain PyTorch fp32 and bf16 loops, the suite in fp32 and its default."
    with user_errors('cpu_bench.py'):
        if steps < 1 or warmup < 1:
            raise UsageError(f'--steps and --warmup must be at least 1, got {steps} and {warmup}')
        if compile and not (shutil.which('cc') or shutil.which('gcc')):
            raise UsageError('--compile needs a C compiler (torch.compile builds its kernels with one): install gcc')
        # a bad --data fails now, not later
        cifar_dls(data, bs=bs, subset=bs * (warmup + steps), device='cpu', verbose=False)
        precision, _, why = auto_precision('cpu')
        print(f'{device_name("cpu")}; {torch.get_num_threads()} torch threads; torch {torch.__version__}; '
              f'auto precision: {precision} ({why})', flush=True)
        rows = []

        def add(name, train_step, test_image):
            rows.append(dict(name=name, step_s=train_step, img_s=bs / train_step, test_img_s=1 / test_image,
                             epochs24_s=projected(train_step, test_image, bs)))
            print(f'  {name}: {bs / train_step:.1f} img/s', flush=True)

        for name, bf16 in (('plain PyTorch, fp32', False), ('plain PyTorch, bf16 + channels-last', True)):
            train_step, test_step = plain_loop(bf16, bf16, bs, steps, warmup)
            add(name, train_step, test_step / bs)
        if compile:
            train_step, test_step = plain_loop(True, True, bs, steps, warmup, compiled=True)
            add('plain PyTorch, bf16 + channels-last, compiled', train_step, test_step / bs)
        prof = None
        with tempfile.TemporaryDirectory() as tmp:
            for name, p in (('suite, fp32', 'fp32'), (f'suite, default (auto: {precision})', 'auto')):
                train_step, test_image, prof = suite(data, p, bs, steps, warmup, Path(tmp) / p,
                                                     profiled=profile_ops and p == 'auto')
                add(name, train_step, test_image)
        print('\n' + table(rows, bs), flush=True)
        result = dict(device=device_name('cpu'), threads=torch.get_num_threads(), torch=torch.__version__, bs=bs,
                      steps=steps, warmup=warmup, auto_precision=precision, rows=rows)
        if profile_ops:
            bf16 = precision == 'bf16'
            print(f"\nTop operations of the suite's default, {warmup + steps} training batches and a test pass "
                  '(self CPU time):\n' + prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=15))
            convs, peak = conv_rates(bs, bf16), matmul_rate(bf16)
            print(f'\nEach convolution, {"bf16" if bf16 else "fp32"}, channels-last, batch {bs}, GFLOP/s '
                  f'(a {"bf16" if bf16 else "fp32"} 4096x4096 matrix multiply here: {peak:.0f} GFLOP/s):')
            print(f'{"conv":22} {"GFLOP a pass":>12} {"forward":>8} {"grad input":>10} {"grad weight":>11}')
            for c in convs:
                print(f'{c["conv"]:22} {c["gflop"]:12.1f} {c["fwd"]:8.0f} {c["bwd_input"]:10.0f} '
                      f'{c["bwd_weight"]:11.0f}')
            result.update(convs=convs, matmul_gflop_s=peak)
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(result, indent=2) + '\n')
