"""The precision and memory layout a device runs natively (bf16 and channels-last, or fp32), and their callbacks."""
import os, platform, warnings

import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.fp16 import AMPMode, MixedPrecision

__all__ = ['PRECISIONS', 'cpu_bf16_unit', 'device_name', 'auto_precision', 'concrete_precision', 'BF16',
           'ChannelsLastBatches']

PRECISIONS = ('auto', 'fp32', 'bf16')


def cpu_bf16_unit():
    "The unit this CPU runs bf16 arithmetic on natively, 'AMX' or 'AVX-512 BF16', or None."
    # torch reads the CPUID flags (amx_tile, avx512_bf16 in /proc/cpuinfo); without one of them oneDNN emulates bf16
    # in fp32 units, slower than fp32 itself.
    if not torch.backends.mkldnn.is_available(): return None
    if torch.cpu._is_amx_tile_supported(): return 'AMX'
    if torch.cpu._is_avx512_bf16_supported(): return 'AVX-512 BF16'
    return None


def device_name(device):
    "The GPU's name, or the CPU's model name with its core count (from /proc/cpuinfo where there is one)."
    device = torch.device(device)
    if device.type == 'cuda': return torch.cuda.get_device_name(device)
    if device.type != 'cpu': return device.type
    try: model = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): model = platform.processor() or 'CPU'
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return f'{model}, {cores} cores'


def auto_precision(device):
    "`(precision, channels_last, why)` for `device`: bf16 autocast + channels-last if it runs bf16 natively, else fp32."
    device = torch.device(device)
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False): return 'bf16', True, f'{name} runs bf16 natively'
        return 'fp32', False, f'{name} has no native bf16'
    if device.type == 'cpu':
        unit = cpu_bf16_unit()
        if unit: return 'bf16', True, f'this CPU has {unit}'
        return 'fp32', False, 'this CPU has neither AMX nor AVX-512 BF16'
    return 'fp32', False, f'bf16 on {device.type} is not known to be native'


def concrete_precision(precision, channels_last, device):
    "`(precision, channels_last, why)` as training uses them: 'auto' resolved by `auto_precision`, the rest as asked."
    if precision != 'auto': return precision, channels_last, 'as asked'
    precision, native_layout, why = auto_precision(device)
    return precision, channels_last or native_layout, f'auto: {why}'


class BF16(MixedPrecision):
    "fastai's bf16 `MixedPrecision` (no loss scaling, no host sync) with autocast on the learner's own device."
    def __init__(self): super().__init__(amp_mode=AMPMode.BF16)

    def before_fit(self):
        # fastai hard-codes CUDA autocast, which on a CPU warns and trains in fp32: its warning is about the autocast
        # replaced on the next line, so it is not shown.
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='CUDA is not available', category=UserWarning)
            super().before_fit()
        self.autocast = torch.autocast(self.dls.device.type, dtype=torch.bfloat16)


class ChannelsLastBatches(ChannelsLast):
    "fastai's `ChannelsLast`, which converts the model only, and each batch converted once as it reaches the model."
    # Otherwise every batch arrives in NCHW and the first convolution converts it, a hidden copy a batch.
    def before_batch(self):
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in self.xb)
