"""The two CIFAR-10 releases (torchvision's Python pickles and the binary files) read straight into uint8 arrays."""
import pickle
from pathlib import Path

import numpy as np

from cli import UsageError

if int(np.__version__.split('.')[0]) >= 2: from numpy._core import multiarray as _multiarray, numeric as _numeric
else: from numpy.core import multiarray as _multiarray, numeric as _numeric  # numpy 2 renamed core to _core

__all__ = ['DataError', 'RELEASES', 'find_release', 'read_release']

N_CLASSES = 10
IMAGE = (3, 32, 32)  # one image in the files: the 1024 red values, then green, then blue, each 32×32 row-major
ROW = 3 * 32 * 32
BATCHES = ('data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch')
# kind: (the folder the release unpacks to, the batch files' suffix, the meta file)
RELEASES = {'pickle': ('cifar-10-batches-py', '', 'batches.meta'),
            'binary': ('cifar-10-batches-bin', '.bin', 'batches.meta.txt')}


class DataError(UsageError):
    "A problem with the data the user pointed at, worded so that they can fix it."


def find_release(root):
    "`(kind, folder)` of the CIFAR-10 release in `root` or in its release-named child folder, else None."
    root = Path(root)
    # A folder with train/ and test/ is an image folder, as it has always been, whatever else it holds.
    if (root / 'train').is_dir() and (root / 'test').is_dir(): return None
    for kind, (_, suffix, meta) in RELEASES.items():
        # Any one file of the release is enough: the reader then names the ones that are missing.
        if any((root / f).is_file() for f in (*(b + suffix for b in BATCHES), meta)): return kind, root
    for kind, (child, _, _) in RELEASES.items():  # the parent, e.g. torchvision's root=
        if (root / child).is_dir(): return kind, root / child
    return None


# ---- the pickles: Python 2 dicts with bytes keys; b'data' is an N×3072 uint8 array -------------------------

class _Refused(pickle.UnpicklingError):
    "A pickle that names a global no CIFAR-10 file needs."


def _latin1(text, encoding):
    "Bytes as Python 3 writes them in a protocol-2 pickle, `_codecs.encode(text, 'latin1')`, and no other codec."
    if encoding != 'latin1': raise _Refused(f'_codecs.encode with {encoding!r}')
    return text.encode('latin1')


# The only globals a pickled numpy array needs: `_reconstruct` (protocol 2, as the release is written, under
# numpy 1's and numpy 2's module names) or `_frombuffer` (protocol 5), ndarray and dtype; and latin-1 bytes,
# for a batch that Python 3 re-saved at protocol 2 (torch's weights_only unpickler allows the same).
_ALLOWED = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype, ('_codecs', 'encode'): _latin1,
            **{(f'numpy.{core}.multiarray', '_reconstruct'): _multiarray._reconstruct for core in ('core', '_core')},
            **{(f'numpy.{core}.numeric', '_frombuffer'): _numeric._frombuffer for core in ('core', '_core')}}


class _ArraysOnly(pickle.Unpickler):
    "An unpickler that builds numpy arrays and plain Python data, and refuses every other global."
    # Unpickling calls whatever globals the file names (os.system, say): a foreign file must not run code.
    # https://docs.python.org/3/library/pickle.html#restricting-globals
    def find_class(self, module, name):
        if (module, name) in _ALLOWED: return _ALLOWED[module, name]
        raise _Refused(f'{module}.{name}')


def _unpickle(f):
    "What the pickle file `f` holds, loaded with only numpy's array globals allowed."
    try:
        # encoding='bytes': the release is Python 2 pickles, whose str keys and pixel strings become bytes.
        with open(f, 'rb') as fh: return _ArraysOnly(fh, encoding='bytes').load()
    except _Refused as e:
        raise DataError(f'refused to unpickle {f}: it calls {e}, which no CIFAR-10 file does; '
                        'is it the right file?') from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError ...: whatever a cut-short or foreign file raises
        why = str(e).splitlines()[0] if str(e) else ''
        raise DataError(f'{f} is not a readable pickle ({type(e).__name__}: {why}); it may be truncated, '
                        'download the release again') from None


def _what(obj):
    "A short description of an unpickled object, for an error message."
    if isinstance(obj, dict): return f'a dict with keys {sorted(map(repr, obj))[:6]}'
    return f'a {type(obj).__name__}'


def _pickle_meta(f):
    "The class names of a `batches.meta` pickle."
    d = _unpickle(f)
    names = d.get(b'label_names') if isinstance(d, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{f} is not a CIFAR-10 meta file: expected a dict with b'label_names', a list of "
                        f'names, got {_what(d)}')
    return _check_classes(f, [n.decode('utf-8', 'replace') if isinstance(n, bytes) else n for n in names])


def _pickle_batch(f, n_classes):
    "Images and labels of one batch pickle."
    d = _unpickle(f)
    if not isinstance(d, dict) or not {b'data', b'labels'} <= d.keys():
        raise DataError(f"{f} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got {_what(d)}")
    return _check_batch(f, d[b'data'], d[b'labels'], n_classes)


# ---- the binary files: records of one label byte and 3072 pixel bytes; the meta file has a name a line -------

def _binary_meta(f):
    "The class names of `batches.meta.txt`, one a line; blank lines (the release ends with some) are skipped."
    try: lines = f.read_text(encoding='utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e: raise DataError(f'could not read {f} as text ({e})') from None
    return _check_classes(f, [l.strip() for l in lines if l.strip()])


def _binary_batch(f, n_classes):
    "Images and labels of one `.bin` batch."
    try: raw = np.fromfile(f, dtype=np.uint8)
    except OSError as e: raise DataError(f'could not read {f} ({e})') from None
    if not raw.size or raw.size % (ROW + 1):
        raise DataError(f'{f} has {raw.size:,} bytes, not a whole number of {ROW + 1:,}-byte records (a label byte '
                        'and 3,072 pixels); it may be truncated, download the release again')
    raw = raw.reshape(-1, ROW + 1)
    return _check_batch(f, np.ascontiguousarray(raw[:, 1:]), raw[:, 0].astype(np.int64), n_classes)


# ---- both --------------------------------------------------------------------------------------------------

def _check_classes(f, names):
    "`names`, if they are CIFAR-10's count of distinct, non-empty class names."
    if len(names) != N_CLASSES:
        raise DataError(f'{f} names {len(names)} classes, and CIFAR-10 has {N_CLASSES}; is it the right meta file?')
    if not all(names) or len(set(names)) != len(names):
        raise DataError(f'{f}: the class names must be distinct and non-empty, got {names}')
    return names


def _check_batch(f, x, y, n_classes):
    "Images as N×3×32×32 uint8 and labels as int64, if `x` and `y` are what a CIFAR-10 batch holds."
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == ROW):
        got = f'{x.dtype} {"×".join(map(str, x.shape))}' if isinstance(x, np.ndarray) else _what(x)
        raise DataError(f'{f}: its data is {got}, not rows of {ROW} uint8 pixels; is it a CIFAR-10 batch?')
    try: y = np.asarray(y)
    except ValueError: y = None  # a ragged list
    if y is None or y.ndim != 1 or (len(y) and y.dtype.kind not in 'iu'):
        raise DataError(f'{f}: its labels are not a list of integers; is it a CIFAR-10 batch?')
    if len(y) != len(x): raise DataError(f'{f} has {len(y):,} labels for {len(x):,} images')
    if not len(x): raise DataError(f'{f} holds no images')
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise DataError(f'{f} has label {bad}, out of range for the {n_classes} classes of the meta file')
    return x.reshape(-1, *IMAGE), y


def read_release(kind, folder):
    "Classes and uint8 arrays of both splits of a release folder, as `data.load_arrays` returns them."
    folder = Path(folder)
    _, suffix, meta = RELEASES[kind]
    files = [folder / (b + suffix) for b in BATCHES]
    missing = [p.name for p in (*files, folder / meta) if not p.is_file()]
    if missing: raise DataError(f'{folder} lacks {", ".join(missing)} of the CIFAR-10 {kind} release; '
                                'download the release again')
    read_meta, read_batch = (_pickle_meta, _pickle_batch) if kind == 'pickle' else (_binary_meta, _binary_batch)
    classes = read_meta(folder / meta)
    batches = [read_batch(f, len(classes)) for f in files]
    # Every file of the release holds the same number of images (10,000); a short one was cut at a record edge.
    for f, (x, _) in zip(files, batches):
        if len(x) != len(batches[0][0]):
            raise DataError(f'{f} holds {len(x):,} images and {files[0].name} {len(batches[0][0]):,}; every file of '
                            'the release holds as many, so one is truncated: download the release again')
    train = [np.concatenate(a) for a in zip(*batches[:-1])]
    return classes, {'train': tuple(train), 'test': batches[-1]}
