"""CIFAR-10 releases (pickle and binary) read to exactly the pixels written; every broken file is one clear error."""
import codecs, importlib.util, json, os, pickle, struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ROOT, make_folder, run_script
from data import DataError, cifar_dls, load_arrays

# The meta file's order, not sorted: the labels index it, so the reader must keep it.
META = ['ship', 'airplane', 'frog', 'truck', 'cat', 'horse', 'bird', 'deer', 'automobile', 'dog']
TRAIN = [f'data_batch_{i}' for i in range(1, 6)]
N = 20  # images per file; the release has 10,000


class Py2Pickler(pickle._Pickler):
    "Writes str and bytes as Python 2 strings (SHORT_BINSTRING, BINSTRING), the opcodes of the release's pickles."
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        b = obj.encode('latin-1') if isinstance(obj, str) else obj
        self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256
                   else pickle.BINSTRING + struct.pack('<i', len(b)) + b)
        self.memoize(obj)
    dispatch[str] = dispatch[bytes] = save_py2_string


def py2_pickle(obj, path):
    "`obj` pickled as the release's Python 2 / numpy 1 files are: protocol 2, numpy.core's `_reconstruct`."
    with open(path, 'wb') as fh: Py2Pickler(fh, protocol=2).dump(obj)
    path.write_bytes(path.read_bytes().replace(b'cnumpy._core.multiarray\n', b'cnumpy.core.multiarray\n'))


def spec_image():
    "One image's 3072 bytes, placed by the spec's index arithmetic: red is the row, green the column + 64, blue 200."
    row = np.empty(3072, np.uint8)
    for c in range(3):
        for r in range(32):
            for col in range(32): row[c * 1024 + r * 32 + col] = (r, col + 64, 200)[c]
    return row


def write_release(root, kind, n=N, seed=0):
    "A CIFAR-10 release folder of `kind` with `n` images per file; returns it and the arrays it holds."
    rng = np.random.default_rng(seed)
    folder = root / ('cifar-10-batches-py' if kind == 'pickle' else 'cifar-10-batches-bin')
    folder.mkdir(parents=True)
    rows, labels = {}, {}
    for i, name in enumerate([*TRAIN, 'test_batch']):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        if i == 0: x[0] = spec_image()
        y = rng.permutation(np.arange(n) % 10)
        rows[name], labels[name] = x, y
        if kind == 'pickle':
            py2_pickle({b'batch_label': f'batch {i + 1} of 6'.encode(), b'labels': [int(v) for v in y], b'data': x,
                        b'filenames': [f'img_{i}_{j}.png'.encode() for j in range(n)]}, folder / name)
        else:
            np.concatenate([y[:, None].astype(np.uint8), x], 1).tofile(folder / f'{name}.bin')
    if kind == 'pickle':
        py2_pickle({b'num_cases_per_batch': n, b'label_names': [c.encode() for c in META], b'num_vis': 3072},
                   folder / 'batches.meta')
    else:
        (folder / 'batches.meta.txt').write_text('\n'.join(META) + '\n\n\n')  # the release ends with blank lines
    x_tr = np.concatenate([rows[b] for b in TRAIN]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([labels[b] for b in TRAIN])
    return folder, {'train': (x_tr, y_tr), 'test': (rows['test_batch'].reshape(-1, 3, 32, 32), labels['test_batch'])}


@pytest.fixture(params=['pickle', 'binary'])
def release(request, tmp_path):
    "A tiny release of each kind: its folder, its kind and the arrays written into it."
    folder, arrays = write_release(tmp_path, request.param)
    return folder, request.param, arrays


def test_arrays_are_the_pixels_and_labels_written(release):
    folder, _, expected = release
    classes, arrays = load_arrays(folder, verbose=False)
    assert classes == META
    for split, n in (('train', 5 * N), ('test', N)):
        x, y = arrays[split]
        assert x.shape == (n, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.array_equal(x, expected[split][0]) and np.array_equal(y, expected[split][1])
    assert not list(folder.rglob('*.npz')) and not list(folder.rglob('*.png'))  # nothing written


def test_channel_planes_and_rows_follow_the_spec(release):
    x = load_arrays(release[0], verbose=False)[1]['train'][0][0]
    r, c = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
    assert np.array_equal(x[0], r) and np.array_equal(x[1], c + 64) and (x[2] == 200).all()


def test_parent_folder_env_var_and_subset(release, monkeypatch):
    folder, _, expected = release
    classes, arrays = load_arrays(folder.parent, verbose=False)  # torchvision's root= holds cifar-10-batches-py/
    assert classes == META and np.array_equal(arrays['test'][0], expected['test'][0])
    monkeypatch.setenv('CIFAR10_DIR', str(folder.parent))
    dls = cifar_dls(bs=10, subset=50, device='cpu', seed=0, verbose=False)
    assert list(dls.vocab) == META and (len(dls.train_ds), len(dls.valid_ds)) == (50, 10)
    assert torch.bincount(torch.cat([y for _, y in dls.valid])).tolist() == [1] * 10


def test_labels_keep_the_meta_order_in_batches_and_items(release):
    folder, _, expected = release
    dls = cifar_dls(folder, bs=N, device='cpu', verbose=False)
    y = expected['test'][1]
    assert list(dls.vocab) == META and torch.cat([yb for _, yb in dls.valid]).tolist() == y.tolist()
    # fastai's per-item path (Interpretation, show_batch) maps the class name back through the vocab.
    assert [int(dls.valid_ds[i][1]) for i in range(N)] == y.tolist()


def test_python3_resaved_pickles_load_too(tmp_path):
    folder, expected = write_release(tmp_path, 'pickle')
    for name, protocol in zip([*TRAIN, 'test_batch'], [2, 2, 3, 4, 5, 2]):  # protocol 2 writes _codecs.encode
        d = pickle.loads((folder / name).read_bytes(), encoding='bytes')  # our own file: plain pickle is safe here
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))
    _, arrays = load_arrays(folder, verbose=False)
    assert np.array_equal(arrays['train'][0], expected['train'][0])


def test_an_image_folder_with_a_release_inside_stays_an_image_folder(tmp_path):
    root = make_folder(tmp_path / 'both', n_train=1, n_test=1)
    write_release(root, 'pickle')
    classes, arrays = load_arrays(root, verbose=False)
    assert classes == sorted(classes) != META and len(arrays['train'][1]) == 10


def test_a_missing_file_is_named(release):
    folder, kind, _ = release
    (folder / ('data_batch_4' + ('.bin' if kind == 'binary' else ''))).unlink()
    with pytest.raises(DataError, match=r'lacks data_batch_4(\.bin)? of the CIFAR-10'):
        load_arrays(folder, verbose=False)


@pytest.mark.parametrize('cut,why', [(100, 'not a whole number of 3,073-byte records'), (3073, 'holds 19 images')])
def test_a_truncated_binary_file_is_named(tmp_path, cut, why):
    folder, _ = write_release(tmp_path, 'binary')
    f = folder / 'data_batch_3.bin'
    f.write_bytes(f.read_bytes()[:-cut])
    with pytest.raises(DataError, match=rf'data_batch_3\.bin.*{why}'): load_arrays(folder, verbose=False)


def test_a_truncated_pickle_is_named(tmp_path):
    folder, _ = write_release(tmp_path, 'pickle')
    f = folder / 'data_batch_2'
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    with pytest.raises(DataError, match=r'data_batch_2 is not a readable pickle.*truncated'):
        load_arrays(folder, verbose=False)


class RunsACommand:
    "Unpickling this calls os.system: the attack a restricted unpickler exists to stop."
    def __init__(self, cmd): self.cmd = cmd
    def __reduce__(self): return os.system, (self.cmd,)


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
    folder, _ = write_release(tmp_path, 'pickle')
    marker = tmp_path / 'ran'
    (folder / 'test_batch').write_bytes(pickle.dumps({b'data': RunsACommand(f'touch {marker}')}, protocol=2))
    with pytest.raises(DataError, match=r'refused to unpickle .*test_batch: it calls (posix|nt)\.system'):
        load_arrays(folder, verbose=False)
    assert not marker.exists()


class EncodesWith:
    "Unpickling this calls `_codecs.encode` with a codec other than latin-1, the one Python 3's protocol 2 uses."
    def __reduce__(self): return codecs.encode, ('pixels', 'rot13')


def test_only_latin1_bytes_are_decoded(tmp_path):
    folder, _ = write_release(tmp_path, 'pickle')
    (folder / 'test_batch').write_bytes(pickle.dumps({b'data': EncodesWith()}, protocol=2))
    with pytest.raises(DataError, match=r"it calls _codecs.encode with 'rot13'"): load_arrays(folder, verbose=False)


def good(): return {b'labels': [1, 2], b'data': np.zeros((2, 3072), np.uint8)}

FOREIGN = {  # what a batch pickle holds instead of the release's dict, and the error that names it
    'a list': ([1, 2, 3], "not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got a list"),
    'str keys': ({'labels': [1, 2], 'data': np.zeros((2, 3072), np.uint8)}, 'got a dict with keys'),
    'no labels': ({b'data': np.zeros((2, 3072), np.uint8)}, 'not a CIFAR-10 batch'),
    'wrong width': ({**good(), b'data': np.zeros((2, 3071), np.uint8)}, r'its data is uint8 2×3071, not rows of 3072'),
    'float pixels': ({**good(), b'data': np.zeros((2, 3072))}, r'its data is float64 2×3072'),
    'float labels': ({**good(), b'labels': [0.5, 1.0]}, 'labels are not a list of integers'),
    'ragged labels': ({**good(), b'labels': [[1], [2, 3]]}, 'labels are not a list of integers'),
    'label count': ({**good(), b'labels': [1, 2, 3]}, '3 labels for 2 images'),
    'label too big': ({**good(), b'labels': [1, 10]}, 'label 10, out of range for the 10 classes'),
    'negative label': ({**good(), b'labels': [-1, 0]}, 'label -1, out of range'),
}


@pytest.mark.parametrize('name', FOREIGN)
def test_a_foreign_pickle_is_named(tmp_path, name):
    folder, _ = write_release(tmp_path, 'pickle')
    obj, why = FOREIGN[name]
    (folder / 'data_batch_5').write_bytes(pickle.dumps(obj, protocol=2))  # str keys stay str, as Python 3 writes
    with pytest.raises(DataError, match=rf'data_batch_5.*{why}'): load_arrays(folder, verbose=False)


def test_binary_labels_out_of_range(tmp_path):
    folder, _ = write_release(tmp_path, 'binary')
    f = folder / 'test_batch.bin'
    raw = bytearray(f.read_bytes())
    raw[3073] = 10  # the second record's label byte
    f.write_bytes(raw)
    with pytest.raises(DataError, match=r'test_batch\.bin has label 10, out of range'):
        load_arrays(folder, verbose=False)


@pytest.mark.parametrize('names,why', [(META[:9], 'names 9 classes, and CIFAR-10 has 10'),
                                       (META[:9] + ['ship'], 'must be distinct')])
def test_a_wrong_meta_file_is_named(release, names, why):
    folder, kind, _ = release
    if kind == 'pickle': py2_pickle({b'label_names': [n.encode() for n in names]}, folder / 'batches.meta')
    else: (folder / 'batches.meta.txt').write_text('\n'.join(names) + '\n')
    with pytest.raises(DataError, match=rf'batches\.meta.*{why}'):
        load_arrays(folder, verbose=False)


def test_a_foreign_meta_pickle_is_named(tmp_path):
    folder, _ = write_release(tmp_path, 'pickle')
    py2_pickle({b'names': [b'a']}, folder / 'batches.meta')
    with pytest.raises(DataError, match=r"batches\.meta is not a CIFAR-10 meta file: "
                                        r"expected a dict with b'label_names'"):
        load_arrays(folder, verbose=False)


# ---- the scripts, as a user runs them --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "run.py on a tiny release of each kind and on a truncated one: (data, run folder, finished process) by name."
    root, jobs = tmp_path_factory.mktemp('runs'), {}
    for kind in ('pickle', 'binary'):
        folder, _ = write_release(root / kind, kind, n=10)  # 2 training steps: the fixed costs are what is tested
        jobs[kind] = folder, ['--epochs', 1, '--bs', 20, '--lr-min', 0.01, '--lr-max', 0.1, '--device', 'cpu',
                              '--seed', 0]
    folder, _ = write_release(root / 'truncated', 'binary', n=10)
    f = folder / 'data_batch_1.bin'
    f.write_bytes(f.read_bytes()[:-5])
    jobs['truncated'] = folder.parent, ['--epochs', 1, '--device', 'cpu']
    # All three at once: each spends most of its seconds importing, one core each, so on two cores they overlap.
    with ThreadPoolExecutor(len(jobs)) as pool:
        done = {name: pool.submit(run_script, 'experiments/run.py', '--data', data, '--out', root / f'run-{name}',
                                  *args)
                for name, (data, args) in jobs.items()}
    return {name: (jobs[name][0], root / f'run-{name}', job.result()) for name, job in done.items()}


@pytest.mark.parametrize('kind', ['pickle', 'binary'])
def test_run_trains_on_a_release(runs, kind):
    folder, out, r = runs[kind]
    assert r.returncode == 0, r.stderr
    config = json.loads((out / 'config.json').read_text())
    assert (config['n_train'], config['n_test']) == (50, 10)
    assert f'reading the CIFAR-10 {kind} release in {folder}' in r.stdout


def test_cams_explains_a_run_on_a_release(runs, tmp_path):
    from cams import explain  # it reloads the run's test images from config['data'], here a release folder
    _, out, r = runs['pickle']
    assert r.returncode == 0, r.stderr
    assert explain(out, n=1, out=tmp_path / 'cams', device='cpu')


def test_run_names_a_truncated_file_in_one_line(runs):
    _, out, r = runs['truncated']
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.startswith('run.py: error: ') and r.stderr.count('\n') == 1 and 'data_batch_1.bin' in r.stderr
    assert not out.exists()


def test_bench_says_its_baselines_need_an_image_folder(tmp_path, capsys):
    folder, _ = write_release(tmp_path / 'data', 'pickle', n=10)
    # In this process, not a new one: it stops before any work, so the seconds a fresh import costs buy nothing.
    spec = importlib.util.spec_from_file_location('bench', ROOT / 'experiments' / 'bench.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as e: bench.main(data=str(folder), out=str(tmp_path / 'bench'))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('bench.py: error: ') and err.count('\n') == 1
    assert 'pickle release' in err and 'image folder' in err and not (tmp_path / 'bench').exists()
