"""CIFAR-10 as fastai `DataLoaders`: read a release or decode images once; gather and augment full batches on device."""
import hashlib, multiprocessing as mp, os, random, signal, tempfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import TfmdDL
from fastai.data.external import URLs, untar_data
from fastai.data.transforms import IndexSplitter, IntToFloatTensor
from fastai.torch_core import TensorCategory, TensorImage
from fastai.vision.core import cifar_stats

from augment import Cutout, LeanNormalize, PadCropFlip
from cli import torch_device
from formats import DataError, find_release, read_release

__all__ = ['DataError', 'IMAGE_EXTS', 'resolve_path', 'scan_folder', 'load_arrays', 'balanced_subset', 'ArrayDL',
           'array_block', 'cifar_dls']

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
SIZE = 32  # CIFAR images are SIZE×SIZE; the network's MaxPool(4) head needs exactly that


def resolve_path(path=None):
    "The CIFAR folder: `path`, else $CIFAR10_DIR, else fastai's download, which fails offline."
    path = path or os.environ.get('CIFAR10_DIR')
    if path: return Path(path).expanduser()
    try: return untar_data(URLs.CIFAR)
    except Exception as e:  # URLError offline; fastdownload raises several kinds on a broken mirror
        raise DataError(f'could not download CIFAR-10 ({type(e).__name__}: {e}); pass --data DIR (a folder with '
                        'train/ and test/, or cifar-10-batches-py/ or -bin/), or set CIFAR10_DIR') from None


def scan_folder(root):
    "Class names, and the image files and labels of each split, in a stable order."
    if not root.exists(): raise DataError(f'data folder {root} does not exist')
    if not root.is_dir(): raise DataError(f'data path {root} is not a folder')
    missing = [s for s in ('train', 'test') if not (root / s).is_dir()]
    if missing: raise DataError(f'data folder {root} has no {" or ".join(m + "/" for m in missing)} '
                                'folder (expected train/<class>/*.png and test/<class>/*.png, or a CIFAR-10 release: '
                                'cifar-10-batches-py/ or cifar-10-batches-bin/, or their parent)')
    classes = sorted(d.name for d in (root / 'train').iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes: raise DataError(f'{root / "train"} has no class folders')
    splits = {}
    for split in ('train', 'test'):
        extra = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and d.name not in classes
                       and not d.name.startswith('.'))
        if extra: raise DataError(f'{root / split} has class folders not in train/: {", ".join(extra)}')
        files, labels = [], []
        for i, c in enumerate(classes):
            d = root / split / c
            fs = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS) if d.is_dir() else []
            files += fs; labels += [i] * len(fs)
        if not files: raise DataError(f'{root / split} has no images ({", ".join(IMAGE_EXTS)})')
        splits[split] = (files, np.array(labels, dtype=np.int64))
    return classes, splits


def _cache_key(root, splits):
    "A digest of every file's relative path, size and modification time: any change gives a new cache."
    h = hashlib.sha1()
    for files, _ in splits.values():
        for f in files:
            st = f.stat()
            h.update(f'{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()[:16]


def _cache_dir(root):
    "`root/.cache` when the data folder is writable, else a per-folder directory under ~/.cache."
    if os.access(root, os.W_OK): return root / '.cache'
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser() / 'resnet9-cifar' / tag


def _decode(f):
    "One image as an H×W×3 uint8 array; greyscale, palette and RGBA images are converted to RGB."
    with Image.open(f) as im: return np.asarray(im.convert('RGB'))


def _decode_some(files):
    "Decode `files` into an N×3×H×W uint8 array; also returns why each unreadable or not SIZE×SIZE file was refused."
    out, bad = np.zeros((len(files), 3, SIZE, SIZE), dtype=np.uint8), []  # zeros: a refused file leaves no noise
    for i, f in enumerate(files):
        try: a = _decode(f)
        except Exception as e: bad.append(f'{f} ({type(e).__name__}: {e})'); continue
        if a.shape[:2] != (SIZE, SIZE): bad.append(f'{f} (size {a.shape[1]}×{a.shape[0]}, expected {SIZE}×{SIZE})')
        else: out[i] = a.transpose(2, 0, 1)
    return out, bad


def _decode_all(files, bad, workers=None):
    "Decode `files` into an N×3×H×W uint8 array on every core, adding to `bad` every file that is refused."
    # Processes, not threads: PIL holds the GIL for 32×32 images (threads measured slower, 0.9 s vs 0.5 s / 5k).
    # Forked, as PyTorch's DataLoader workers are on Linux: no re-import of this module in each worker.
    workers = min(workers or os.cpu_count() or 1, len(files) // 2500 + 1)  # a small folder is quicker in one
    if workers == 1: parts = [_decode_some(files)]
    else:
        ctx = mp.get_context('fork') if 'fork' in mp.get_all_start_methods() else None
        step = -(-len(files) // (4 * workers))  # four chunks a worker, in order, so a slow chunk holds up little
        # The workers leave Ctrl-C to the main process, which says what it stopped (no traceback from each worker).
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=signal.signal,
                                 initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            parts = list(pool.map(_decode_some, [files[i:i + step] for i in range(0, len(files), step)]))
    for _, b in parts: bad += b
    return np.concatenate([o for o, _ in parts])


def load_arrays(root, cache_dir=None, verbose=True, workers=None):
    "Classes and uint8 arrays of both splits: read from a release, or decoded once (`workers` processes) and cached."
    root = Path(root)
    release = find_release(root)
    if release:  # raw pixels already: all 60,000 read in under a second (cpu-checks/release-read.log), no cache needed
        if verbose: print(f'reading the CIFAR-10 {release[0]} release in {release[1]}')
        return read_release(*release)
    classes, splits = scan_folder(root)
    key = _cache_key(root, splits)
    cache_dir = Path(cache_dir) if cache_dir else _cache_dir(root)
    cache = cache_dir / f'cifar-uint8-{key}.npz'
    if cache.exists():
        with np.load(cache) as z:
            if list(z['classes']) == classes:
                return classes, {s: (z[f'{s}_x'], z[f'{s}_y']) for s in splits}
    if verbose: print(f'decoding {sum(len(f) for f, _ in splits.values()):,} images from {root} once; '
                      f'caching them in {cache_dir}')
    bad = []
    arrays = {s: (_decode_all(files, bad, workers), labels) for s, (files, labels) in splits.items()}
    # Stop before training and name them all: silently skipping would change the dataset under the user.
    if bad: raise DataError(f'{len(bad)} unreadable image(s), fix or remove them: ' + '; '.join(bad))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename: a killed process never leaves a half-written cache.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix='.tmp', delete=False) as tmp:
            np.savez(tmp, classes=np.array(classes), **{f'{s}_{k}': a for s, (x, y) in arrays.items()
                                                        for k, a in (('x', x), ('y', y))})
        os.replace(tmp.name, cache)
        for old in cache_dir.glob('cifar-uint8-*.npz'):  # stale caches of earlier versions of the files
            if old != cache: old.unlink(missing_ok=True)
    except OSError as e:
        if verbose: print(f'warning: could not write the decode cache in {cache_dir} ({e}); continuing without it')
    return classes, arrays


def balanced_subset(labels, n, n_classes, seed=0):
    "Sorted indices of `n` items of `labels`, as even across the classes as they allow, drawn with `seed`."
    rng = np.random.default_rng(seed)
    take = [n // n_classes + (c < n % n_classes) for c in range(n_classes)]
    idx = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in enumerate(take)]
    return np.sort(np.concatenate(idx))


class ArrayDL(TfmdDL):
    "A `TfmdDL` that gathers whole batches from in-memory uint8 tensors: no decoding and no per-item Python."
    def __init__(self, dataset=None, images=None, labels=None, **kwargs):
        kwargs['num_workers'] = 0  # a batch is one tensor gather; worker processes would only add copies
        super().__init__(dataset, **kwargs)
        self.images, self.labels = images, labels
        self.rows = torch.as_tensor(list(dataset.items), dtype=torch.long, device=images.device)

    def get_idxs(self):
        "This epoch's order as one tensor: a permutation seeded from the DataLoader's own `rng`, like fastai's."
        if not self.shuffle: return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.rng.randint(0, 2 ** 63 - 1)))

    # The whole order at once, not fastai's item-by-item generator over it. `__iter__` stores what `get_idxs`
    # returned (or what get_preds swapped in for it) as the name-mangled `__idxs` that fastai's `sample` reads too.
    def sample(self): return self._DataLoader__idxs

    def create_batches(self, order):
        # `order` is our tensor, or under fastai's DistributedDL this rank's share of it as a generator of ints.
        order = order if isinstance(order, torch.Tensor) else torch.tensor(list(order), dtype=torch.long)
        rows = self.rows[order.to(self.rows.device)]
        for b in rows.split(self.bs):
            if self.drop_last and len(b) < self.bs: return
            yield TensorImage(self.images[b]), TensorCategory(self.labels[b])

    def new(self, dataset=None, cls=None, **kwargs):
        return super().new(dataset, cls, **{'images': self.images, 'labels': self.labels, **kwargs})


def _image(images, i): return TensorImage(images[i])
def _label(labels, vocab, i): return vocab[int(labels[i])]


def array_block(images, labels, vocab, test_idx, pad=4, cutout=8):
    "The DataBlock over in-memory arrays: items are row numbers, the test rows are the validation set."
    return DataBlock(
        # The per-item getters serve fastai's one-item paths (summary, show_batch, Interpretation);
        # training batches come from `ArrayDL.create_batches` in one gather.
        blocks=(TransformBlock(batch_tfms=IntToFloatTensor, dl_type=ArrayDL,
                               dls_kwargs=dict(images=images, labels=labels)),
                # Unsorted: batches carry the label numbers as stored, which index `vocab` in its given order
                # (a release's meta file need not be alphabetical; fastai sorts by default).
                CategoryBlock(vocab=vocab, sort=False)),
        get_x=partial(_image, images), get_y=partial(_label, labels, vocab),
        splitter=IndexSplitter(test_idx),
        batch_tfms=[PadCropFlip(pad, flip_p=0.5), LeanNormalize.from_stats(*cifar_stats), Cutout(cutout)])


def cifar_dls(path=None, bs=512, subset=None, device=None, seed=None, cache_dir=None, verbose=True):
    "CIFAR-10 `DataLoaders` from train/<class>/ and test/<class>/ images, or a release folder; test validates."
    root = resolve_path(path)
    classes, arrays = load_arrays(root, cache_dir=cache_dir, verbose=verbose)
    (x_tr, y_tr), (x_te, y_te) = arrays['train'], arrays['test']
    if subset is not None and subset < len(classes):
        raise DataError(f'--subset {subset} is smaller than the number of classes ({len(classes)}); '
                        f'use at least {len(classes)}')
    if subset:  # a fixed class-balanced draw, the same for every seed, so that runs stay comparable
        tr, te = balanced_subset(y_tr, subset, len(classes)), balanced_subset(y_te, subset // 5, len(classes))
        x_tr, y_tr, x_te, y_te = x_tr[tr], y_tr[tr], x_te[te], y_te[te]
    device = torch_device(device)
    # The whole uint8 dataset lives on the training device (180 MB for CIFAR-10), so batches never cross the bus.
    images = torch.from_numpy(np.concatenate([x_tr, x_te])).to(device)
    labels = torch.from_numpy(np.concatenate([y_tr, y_te])).to(device)
    test_idx = list(range(len(x_tr), len(images)))
    dls = array_block(images, labels, classes, test_idx).dataloaders(range(len(images)), bs=bs, device=device)
    if seed is not None:
        for i, dl in enumerate(dls.loaders): dl.rng = random.Random(seed + i)
    return dls
