"""cifar_dls: the test split validates, images are decoded once into a keyed cache, batches are gathered whole."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from fastai.vision.core import cifar_stats

import data
from conftest import CLASSES
from data import DataError, balanced_subset, cifar_dls, load_arrays


def decoded(folder, split):
    "The folder's images of a split, decoded independently with PIL, in the loader's order (class, file name)."
    files = sorted((p for p in (folder / split).glob('*/*')), key=lambda p: (p.parent.name, p.name))
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert('RGB'))).permute(2, 0, 1) for f in files])


def normalized(x):
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in cifar_stats)
    return (x.float() / 255 - mean) / std


def test_vocab_sizes_and_test_split_is_validation(tiny):
    dls = cifar_dls(tiny, bs=4, device='cpu', seed=0, verbose=False)
    assert list(dls.vocab) == CLASSES
    assert (len(dls.train_ds), len(dls.valid_ds)) == (60, 20)
    xs, ys = zip(*dls.valid)
    assert torch.allclose(torch.cat(xs), normalized(decoded(tiny, 'test')), atol=1e-5)  # only normalized
    assert torch.cat(ys).tolist() == [c for c in range(10) for _ in range(2)]


def test_validation_is_identical_on_every_pass_and_training_is_not(tiny):
    dls = cifar_dls(tiny, bs=20, device='cpu', seed=0, verbose=False)
    v1, v2 = (torch.cat([x for x, _ in dls.valid]) for _ in range(2))
    assert torch.equal(v1, v2)
    t1, t2 = (torch.cat([x for x, _ in dls.train]) for _ in range(2))
    assert t1.shape == (60, 3, 32, 32) and not torch.equal(t1, t2)


def test_training_batches_skip_the_per_item_path(tiny):
    dls = cifar_dls(tiny, bs=8, device='cpu', seed=0, verbose=False)
    dls.train.one_batch()  # fastai's one per-item pass for types, done once at set-up
    def per_item(*a): raise AssertionError('per-item path used')
    dls.train.create_item = dls.valid.create_item = per_item
    assert sum(len(x) for x, _ in dls.train) == 56 and sum(len(x) for x, _ in dls.valid) == 20


def test_same_seed_same_order(tiny):
    a, b = (cifar_dls(tiny, bs=60, device='cpu', seed=3, verbose=False).train for _ in range(2))
    torch.manual_seed(0); ya = next(iter(a))[1]
    torch.manual_seed(0); yb = next(iter(b))[1]
    assert torch.equal(ya, yb)


def test_decode_once_then_read_the_cache(tiny, monkeypatch):
    classes, arrays = load_arrays(tiny, verbose=False)
    caches = list((tiny / '.cache').glob('cifar-uint8-*.npz'))
    assert len(caches) == 1 and not list((tiny / '.cache').glob('*.tmp'))
    monkeypatch.setattr(data, '_decode', lambda f: pytest.fail('decoded again'))
    classes2, arrays2 = load_arrays(tiny, verbose=False)
    assert classes2 == classes and np.array_equal(arrays2['train'][0], arrays['train'][0])
    assert np.array_equal(arrays['test'][0], decoded(tiny, 'test').numpy())


def test_changed_files_give_a_new_cache_and_drop_the_stale_one(tiny):
    load_arrays(tiny, verbose=False)
    old = next((tiny / '.cache').glob('*.npz'))
    f = tiny / 'train' / 'c0' / '0001.png'
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    _, arrays = load_arrays(tiny, verbose=False)
    new = list((tiny / '.cache').glob('*.npz'))
    assert len(new) == 1 and new[0] != old
    assert arrays['train'][0][1].max() == 0  # the new pixels, not the cached ones


def test_greyscale_palette_and_rgba_are_converted(tiny):
    d = tiny / 'train' / 'c1'
    Image.fromarray(np.full((32, 32), 200, np.uint8), 'L').save(d / 'grey.png')
    Image.fromarray(np.full((32, 32, 4), 100, np.uint8), 'RGBA').save(d / 'rgba.png')
    Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).convert('P').save(d / 'palette.png')
    _, arrays = load_arrays(tiny, verbose=False)
    x, y = arrays['train']
    assert x.shape == (63, 3, 32, 32) and (y == 1).sum() == 9


@pytest.mark.parametrize('content,why', [(b'not an image', 'UnidentifiedImageError'), (None, 'size 20×16')])
def test_bad_images_are_named(tiny, content, why):
    f = tiny / 'test' / 'c3' / 'bad.png'
    if content is None: Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(f)
    else: f.write_bytes(content)
    with pytest.raises(DataError, match=rf'1 unreadable image.*bad\.png.*{why}'): load_arrays(tiny, verbose=False)


def test_bad_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match='does not exist'): cifar_dls(tmp_path / 'nope', verbose=False)
    (tmp_path / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(DataError, match=r'no test/ folder'): cifar_dls(tmp_path, verbose=False)
    (tmp_path / 'test').mkdir()
    with pytest.raises(DataError, match='has no images'): cifar_dls(tmp_path, verbose=False)


def test_offline_download_becomes_one_clear_error(monkeypatch):
    monkeypatch.delenv('CIFAR10_DIR', raising=False)
    def offline(url): raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(data, 'untar_data', offline)
    with pytest.raises(DataError, match='could not download CIFAR-10.*--data'): cifar_dls()


def test_env_var_names_the_folder(tiny, monkeypatch):
    monkeypatch.setenv('CIFAR10_DIR', str(tiny))
    assert len(cifar_dls(device='cpu', verbose=False).valid_ds) == 20


def test_balanced_subset():
    labels = np.repeat(np.arange(10), 50)
    idx = balanced_subset(labels, 103, 10)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.sum() == 103 and counts.max() - counts.min() == 1
    assert np.array_equal(idx, balanced_subset(labels, 103, 10))  # the same draw every time


def test_subset_of_real_cifar(cifar10):
    dls = cifar_dls(cifar10, bs=50, subset=300, device='cpu', verbose=False)
    assert (len(dls.train_ds), len(dls.valid_ds)) == (300, 60)
    ys = torch.cat([y for _, y in dls.valid])
    assert torch.bincount(ys).tolist() == [6] * 10


def test_decoding_in_worker_processes_equals_decoding_in_one(tiny):
    f = tiny / 'train' / 'c4' / 'bad.png'
    f.write_bytes(b'not an image')
    _, splits = data.scan_folder(tiny)
    files = splits['train'][0]
    bad1, bad2 = [], []
    one, many = data._decode_all(files, bad1, workers=1), data._decode_all(files * 100, bad2, workers=2)
    assert np.array_equal(np.concatenate([one] * 100), many)  # 6,100 files: more than one worker's share
    assert bad2 == bad1 * 100 and len(bad1) == 1 and 'bad.png' in bad1[0]
