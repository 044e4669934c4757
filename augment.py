"""Per-image CIFAR augmentations for whole batches: pure tensor functions and their thin fastai wrappers.

Each function draws its randomness per image, on the batch's own device, so it runs where the batch
lives (GPU or CPU) with no per-item Python. fastai 2.8 lacks all three as batch transforms:
its `RandomCrop` only handles PIL images, its `RandTransform.p` is drawn once per batch, and its
`RandomErasing` erases the same rectangle in every image of a batch (see FASTAI_NOTES.md).
"""
import torch
from fastai.data.transforms import Normalize
from fastai.vision.augment import RandTransform
from fastai.torch_core import TensorImage

__all__ = ['batch_crop', 'batch_flip_lr', 'batch_cutout', 'PadCropFlip', 'Cutout', 'LeanNormalize']


def _reflect(i, n):
    "Map indices in [-(n-1), 2(n-1)] onto [0, n-1] by mirror reflection (the edge is not repeated)."
    return (n - 1) - ((n - 1) - i.abs()).abs()


def _inside(pos, start, size): return (pos >= start) & (pos < start + size)


def batch_crop(x, pad=4, flip_p=0.):
    "N×C×H×W `x`: each image a random crop of its `pad`-pixel reflection padding, mirrored with probability `flip_p`."
    n, c, h, w = x.shape
    shift = torch.randint(-pad, pad + 1, (2, n, 1), device=x.device)  # per-image (dy, dx)
    rows = _reflect(shift[0] + torch.arange(h, device=x.device), h)   # N×H source rows
    cols = _reflect(shift[1] + torch.arange(w, device=x.device), w)   # N×W source columns
    if flip_p: cols = torch.where(torch.rand(n, 1, device=x.device) < flip_p, cols.flip(1), cols)
    # One gather does pad, crop and flip together: no padded copy, and one read of the batch instead of three.
    src = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, src).view(n, c, h, w)


def batch_flip_lr(x, p=0.5):
    "Flip each image of `x` left-right with probability `p`, independently."
    return batch_crop(x, pad=0, flip_p=p)


def batch_cutout(x, size=8):
    "Zero one `size×size` square per image of `x`, at an independent random place inside the image."
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n, 1), device=x.device)
    left = torch.randint(0, w - size + 1, (n, 1), device=x.device)
    rows = _inside(torch.arange(h, device=x.device), top, size).to(x.dtype)   # N×H indicator
    cols = _inside(torch.arange(w, device=x.device), left, size).to(x.dtype)  # N×W indicator
    # Multiplying by a 0/1 mask is 4× faster than `masked_fill` with a broadcast mask on CPU.
    return x * (1 - rows[:, None, :, None] * cols[:, None, None, :])


# The wrappers below are training-only (`RandTransform.split_idx = 0`); `p=1` makes fastai always call
# them, and the per-image draws happen inside the pure functions above.

class PadCropFlip(RandTransform):
    "Batch pad, random crop and left-right flip in one gather; on uint8, so before `IntToFloatTensor` (order 10)."
    order = 1
    def __init__(self, pad=4, flip_p=0.5): super().__init__(p=1.); self.pad, self.flip_p = pad, flip_p
    def encodes(self, x: TensorImage): return batch_crop(x, self.pad, self.flip_p)


class Cutout(RandTransform):
    "Batch Cutout (DeVries & Taylor, 2017) after `Normalize` (order 99), so a fill of 0 is the dataset mean."
    order = 100
    def __init__(self, size=8): super().__init__(p=1.); self.size = size
    def encodes(self, x: TensorImage): return batch_cutout(x, self.size)


class LeanNormalize(Normalize):
    "fastai's `Normalize` with one temporary batch instead of two: the CPU loader runs about 20% faster."
    def encodes(self, x: TensorImage): return (x - self.mean).div_(self.std)
