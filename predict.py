"""A prediction for any image: load it as the test set was loaded, return the top-k classes with their probabilities."""
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from fastai.callback.core import Callback
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import IndexSplitter, ItemGetter, Normalize
from fastcore.basics import noop
from fastai.vision.augment import Resize, ResizeMethod
from fastai.vision.core import PILImage, cifar_stats
from fastai.vision.data import ImageBlock

from arch import custom_resnet
from cli import UsageError
from data import SIZE  # SIZE: the network's input is SIZE×SIZE, as the data's
from interpret import expected_calibration_error
from precision import ChannelsLastBatches, auto_precision
from train import ScaledCrossEntropy, cifar_learner

__all__ = ['CIFAR10_CLASSES', 'SIZE', 'Prediction', 'read_image', 'network_view', 'to_input', 'preprocess', 'predict',
           'eval_mode', 'mirror_tta', 'Mirror', 'Evaluation', 'evaluate', 'native_precision', 'RGBImage',
           'inference_dls', 'export_learner']

# CIFAR-10's classes in label order, which is also the sorted order of its folders and so of `dls.vocab`.
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


class Prediction(NamedTuple):
    "One class of a prediction and its probability."
    label: str
    prob: float


def read_image(path, max_pixels=None):
    "The image file at `path` as an RGB PIL image, or a one-line `UsageError` saying why it can't be read."
    path = Path(path)
    if not path.exists(): raise UsageError(f'image {path} does not exist')
    if path.is_dir(): raise UsageError(f'image {path} is a folder, not an image file')
    try:
        with Image.open(path) as im:  # reads the header only: the size is known before any pixel is decoded
            w, h = im.size
            if max_pixels and w * h > max_pixels:  # a decompression bomb stops here, at a few bytes read
                raise UsageError(f'image {path} is {w}×{h} pixels, over the limit of {max_pixels:,} pixels')
            # An animated GIF or a multi-page TIFF opens at its first frame, and that frame is the one converted.
            # A phone photo stores its rotation in EXIF; without this a portrait shot reaches the network sideways.
            return _rgb(ImageOps.exif_transpose(im))  # converting also decodes: a truncated file fails here
    except UsageError: raise
    # PIL's own guard, at twice its MAX_IMAGE_PIXELS, met in open() before ours
    except Image.DecompressionBombError as e:
        limit = min(max_pixels or float('inf'), 2 * Image.MAX_IMAGE_PIXELS)  # the image is over both
        raise UsageError(f'image {path} is over the limit of {limit:,} pixels ({e})') from None
    # PIL raises many kinds for a damaged file (OSError, SyntaxError, ValueError), as data.py finds.
    except Exception as e: raise UsageError(f'image {path} cannot be read ({type(e).__name__}: {e})') from None


def _rgb(im):
    "`im` in RGB, alpha dropped as data.py drops it from the training images; 16-bit and float images scaled to 8 bits."
    # Through RGBA for a palette with a transparent colour, as Pillow asks (it warns otherwise); the RGB is the same.
    if im.mode == 'P' and 'transparency' in im.info: im = im.convert('RGBA')
    # Pillow's convert('RGB') clips a 16-bit (I;16…) or 32-bit (I, F) grey image at 255 instead of scaling it: a
    # 16-bit PNG would come out nearly all white. Scaled here by its type's range (float: taken as 0–1).
    if im.mode.startswith('I') or im.mode == 'F':
        a = np.asarray(im, dtype=np.float64)
        # 'I' (32-bit) says nothing of its range: a PNG's 16-bit grey may open so, 8-bit data converted to it too.
        top = 1.0 if im.mode == 'F' else 65535.0 if im.mode.startswith('I;16') or (a.size and a.max() > 255) else 255.0
        im = Image.fromarray(np.rint(np.clip(a / top, 0, 1) * 255).astype(np.uint8))
    return im.convert('RGB')  # CMYK, YCbCr, LA, L, 1 and the rest: Pillow's own conversions


def _as_pil(img):
    "A path, PIL image, or H×W[×3|4] uint8 (0–255) or float (0–1) array or tensor, as an RGB PIL image."
    if isinstance(img, (str, Path)): return read_image(img)
    if isinstance(img, Image.Image): return _rgb(img)
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise UsageError(f'an image array must be H×W, H×W×3 or H×W×4 (channels last), got shape {tuple(a.shape)}')
    if a.dtype.kind == 'f':
        # 0–255 floats would be clipped to white without a word; make the caller say which range they mean.
        if a.size and not (a.min() >= 0 and a.max() <= 1):
            raise UsageError('a float image must be in [0, 1]; pass uint8 for 0–255')
        a = np.rint(a * 255)
    elif a.dtype != np.uint8: raise UsageError(f'an image array must be uint8 or float, got {a.dtype}')
    return _rgb(Image.fromarray(a.astype(np.uint8)))


def network_view(img):
    "The SIZE×SIZE×3 uint8 array the network sees of `img` (anything `predict` takes)."
    im = _as_pil(img)
    # Squashed to SIZE×SIZE, not cropped, so the whole picture as the user framed it stays in view. BICUBIC is
    # Pillow's own default; Pillow widens the filter to the whole footprint when shrinking, so a 4000-px photo is
    # averaged down (no aliasing) and edges stay sharper than with BILINEAR, without LANCZOS's ringing at 32 px.
    # A SIZE×SIZE image, a CIFAR one or what this returned, passes through unchanged.
    return np.array(im.resize((SIZE, SIZE), Image.Resampling.BICUBIC))  # a writable copy, not a view of PIL's buffer


def to_input(view):
    "A SIZE×SIZE×3 uint8 array as the network's 1×3×SIZE×SIZE input, normalized as the test set is."
    # The test pipeline's two steps (data.py): IntToFloatTensor divides by 255, then Normalize with cifar_stats.
    x = torch.tensor(np.asarray(view)).permute(2, 0, 1)[None].float() / 255
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    return (x - mean) / std


def preprocess(img):
    "`img` (anything `predict` takes) as the network's normalized 1×3×SIZE×SIZE input, on the CPU."
    return to_input(network_view(img))


@contextmanager
def eval_mode(model):
    "`model` in eval mode inside the block, and in the mode it had after it."
    # A model already in eval mode is left untouched, never switched: app.py runs several requests on one model at
    # once, and one request's switch back would reach another's forward pass.
    was_training = model.training
    if was_training: model.eval()
    try: yield model
    finally:
        if was_training: model.train()


def mirror_tta(model, x):
    "Mirror test-time augmentation, as in cifar10-fast: the mean of the logits of each image in `x` and of its mirror."
    return (model(x) + model(x.flip(-1))) / 2


def predict(model, img, classes, k=3, tta=False):
    "The `k` likeliest `classes` of `img` (a path, PIL image, or H×W×3 uint8 0–255 or float 0–1 array or tensor)."
    # tta: average the logits of the image and of its left-right mirror (`mirror_tta`).
    if k < 1: raise UsageError(f'k must be at least 1, got {k}')
    x = preprocess(img).to(next(model.parameters()).device)  # on the model's device; the model is not moved
    with eval_mode(model), torch.no_grad():  # BatchNorm's running statistics, not a batch of one's
        logits = mirror_tta(model, x) if tta else model(x)
    if logits.shape[1] != len(classes):
        raise UsageError(f'the model has {logits.shape[1]} outputs but {len(classes)} class names were given')
    # The loss's own activation, softmax(scale × logits): the probabilities the run trained. `load_model` gives the
    # model its run's scale; any other model gets the recipe's.
    probs = ScaledCrossEntropy(getattr(model, 'logit_scale', ScaledCrossEntropy().scale)).activation(logits)[0]
    top = probs.topk(min(k, len(classes)))
    return [Prediction(classes[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


class Mirror(Callback):
    "Every batch mirrored left to right before it reaches the model: the second pass of `evaluate`'s mirror TTA."
    # Not fastai's `Learner.tta`: that averages four passes with the *training* augmentations (here random crops and
    # Cutout, which hides part of each image) and blends them 3:1 with the plain pass: neither cifar10-fast's TTA nor
    # repeatable without a seed.
    order = ChannelsLastBatches.order - 1  # flipped before any change of memory layout
    def before_batch(self): self.learn.xb = tuple(x.flip(-1) for x in self.xb)


class Evaluation(NamedTuple):
    "A model's final test-set numbers (`metrics`) and the probabilities (plain and mirror-TTA) and targets behind them."
    metrics: dict
    probs: torch.Tensor
    targs: torch.Tensor
    tta_probs: torch.Tensor = None


def evaluate(learn, dl=None, tta=True):
    "The test set's accuracy with and without mirror TTA, NLL and expected calibration error, by fastai's `get_preds`."
    # Two passes in the learner's own precision and layout: the images, then their mirrors. The accuracy without TTA
    # is the recipe's number (metrics.csv's last test_acc); the calibration is that of the same, plain, probabilities.
    dl = dl if dl is not None else learn.dls.valid
    with learn.no_bar(), learn.no_logging():
        logits, targs = learn.get_preds(dl=dl, act=noop)
        if tta: mirrored, _ = learn.get_preds(dl=dl, act=noop, cbs=Mirror())
    scale = learn.loss_func.scale
    logits, targs = logits.float(), targs.long()
    probs = F.softmax(scale * logits, dim=1)
    metrics = dict(test_acc=(logits.argmax(1) == targs).float().mean().item())
    tta_probs = F.softmax(scale * (logits + mirrored.float()) / 2, dim=1) if tta else None
    if tta: metrics['test_acc_tta'] = (tta_probs.argmax(1) == targs).float().mean().item()
    # The mean negative log-likelihood of the true class: the test loss, since the loss is plain cross-entropy.
    metrics.update(nll=F.cross_entropy(scale * logits, targs).item(), ece=expected_calibration_error(probs, targs),
                   n_images=len(targs))
    return Evaluation(metrics, probs, targs, tta_probs)


def native_precision(precision, device):
    "The precision to evaluate a `precision` run in on `device`: its own if the hardware runs it natively, else fp32."
    # On a CPU without AMX or AVX-512 BF16, bf16 is emulated, several times slower than fp32 (7 min for the shipped
    # model's test set on such a machine): fp32 there, at a measured cost in agreement (docs/evaluation.md).
    if precision == 'bf16' and auto_precision(device)[0] != 'bf16': return 'fp32'
    return precision


# ---- fastai's way to share a model: learn.export() and load_learner --------------------------------------------

class RGBImage(PILImage):
    "fastai's `PILImage` as `predict` makes it: EXIF rotation applied, any mode to RGB, arrays as `predict` takes them."
    # fastai's own `PILImage.create` neither applies EXIF rotation nor converts a PIL image it is handed (an RGBA
    # image would reach the network with 4 channels), and a bad file would raise PIL's error, not our one line.
    # The annotation is what fastai's `test_dl` matches an item against to know where its pipeline starts.
    @classmethod
    def create(cls, img: Path | str | Image.Image | np.ndarray | torch.Tensor, **kwargs): return cls(_as_pil(img))


def inference_dls(classes, device=None):
    "Item-free fastai `DataLoaders` that take an image to the network's input exactly as `preprocess` does."
    # The exported learner's `dls`. The training DataLoaders can't be exported as they are: fastai's `export` keeps
    # their transforms (`new_empty` drops only the items), and data.py's `ArrayDL` and getters hold the whole uint8
    # dataset, so every training image would be pickled. These hold the steps of `preprocess`, in fastai's own
    # transforms: RGB (`RGBImage`), squashed to SIZE×SIZE with BICUBIC (`network_view`), then /255 and cifar_stats.
    dblock = DataBlock(blocks=(ImageBlock(RGBImage), CategoryBlock(vocab=list(classes), sort=False)),
                       get_x=ItemGetter(0), get_y=ItemGetter(1), splitter=IndexSplitter([]),
                       item_tfms=Resize(SIZE, ResizeMethod.Squish,
                                        resamples=(Image.Resampling.BICUBIC, Image.Resampling.NEAREST)),
                       batch_tfms=Normalize.from_stats(*cifar_stats, cuda=False))
    # fastai infers a pipeline's types from its first item, so it is built on one blank image, then emptied.
    blank = (Image.new('RGB', (SIZE, SIZE)), classes[0])
    return dblock.dataloaders([blank], bs=1, device=device).new_empty()


def export_learner(model, classes, file, device=None, logit_scale=0.125):
    "Write `file` with `learn.export()`: an fp32 copy of `model` and `inference_dls(classes)`, for `load_learner`."
    file = Path(file)
    # A fresh copy, not the training learner's model: no bf16 or channels-last callbacks travel, and the weights
    # are plain fp32, so `load_learner(...).predict` gives `predict`'s probabilities.
    net = custom_resnet(len(classes))
    net.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    # The run's logit scale, so that the loss's activation gives the probabilities the run trained (as `predict`).
    learn = cifar_learner(inference_dls(classes, device), net.eval(), logit_scale=logit_scale, path=file.parent)
    learn.export(file.name)
    return file
