"""app.py as a public server, over real HTTP on 127.0.0.1: each limit and odd image refused or read with its message
while the server serves on, no cross-talk between concurrent requests, and a start without the data set."""
import os, shutil, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, need_app, run_alone, run_here, run_script

sys.path.insert(0, str(ROOT / 'experiments'))
from app import PREDICTED  # noqa: E402
from app_load import Api, AppError, classify, load_test, mistakes, same  # noqa: E402

LIMITS = {'max-file-mb': 1, 'max-images': 3, 'max-pixels': 250_000}  # small, so that the bad files stay small


@pytest.fixture(scope='module')
def server(tiny_run, tmp_path_factory):
    "app.py serving the tiny run with small limits, on a free port."
    need_app()
    from app import serving
    log = tmp_path_factory.mktemp('app-server') / 'app.log'
    args = [a for k, v in LIMITS.items() for a in (f'--{k}', v)]
    try:
        with serving(tiny_run, log=log, args=args) as s:
            s.log = log
            yield s
    except (RuntimeError, TimeoutError) as e: pytest.fail(f'{e}\n{log.read_text()[-3000:]}')


@pytest.fixture(scope='module')
def model(tiny_run):
    from run_folder import load_model
    return load_model(tiny_run, 'cpu')


def picture(path, size=(40, 30), seed=0):
    "A random RGB picture saved at `path`; its pixels."
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return a


def expect(model, img, tta=False):
    "What the app should answer for `img` as the top-3 (label, probability) pairs: predict.py's own answer."
    from predict import predict
    net, classes = model
    return [(p.label, p.prob) for p in predict(net, img, classes, k=3, tta=tta)]


def refused(api, files, message):
    "Send `files` to /classify: the app answers with `message`, never its own temp path, and then serves a good image."
    with pytest.raises(AppError) as e: api.call('classify', [api.upload(f) for f in files], 3, 'layer3', PREDICTED, 0.5)
    assert message in str(e.value) and '/tmp/gradio' not in str(e.value), str(e.value)
    return str(e.value)


def test_each_limit_and_broken_file_has_its_message(server, tmp_path, model):
    api = Api(server.url)
    good = tmp_path / 'good.png'
    picture(good)
    big = tmp_path / 'big.png'
    big.write_bytes(np.random.default_rng(0).bytes(int(1.5 * 2**20)))
    with pytest.raises(AppError, match='HTTP 413'): api.upload(big)  # Gradio refuses it before storing it
    refused(api, [good] * 4, '4 images in one request; the limit is 3')
    bomb = tmp_path / 'bomb.png'
    Image.new('L', (1000, 1000)).save(bomb)  # 1,000,000 pixels in under 2 KB
    assert bomb.stat().st_size < 5000
    refused(api, [bomb], 'bomb.png is 1000×1000 pixels, over the limit of 250,000 pixels')
    text = tmp_path / 'notes.png'
    text.write_text('not an image at all')
    refused(api, [text], 'notes.png cannot be read (UnidentifiedImageError')
    cut = tmp_path / 'cut.png'
    cut.write_bytes(good.read_bytes()[:300])
    refused(api, [cut], 'cut.png cannot be read')
    refused(api, [good, text], 'notes.png cannot be read')  # one bad file of several: its name, no partial answer
    # What the page's widgets can't send, a program can: each refused (by Gradio's own checks), with its reason.
    for k, layer, target, opacity, why in [(0, 'layer3', PREDICTED, 0.5, 'Value 0 is less than minimum value 1'),
                                           (99, 'layer3', PREDICTED, 0.5, 'Value 99 is greater than maximum value 10'),
                                           (3, 'layer9', PREDICTED, 0.5,
                                            "'layer9' (type: <class 'str'>) is not in the list"),
                                           (3, 'layer3', 'unicorn', 0.5, 'unicorn is not in the list of choices'),
                                           (3, 'layer3', PREDICTED, 7, 'Value 7 is greater than maximum value 1')]:
        with pytest.raises(AppError) as e: api.call('classify', [api.upload(good)], k, layer, target, opacity)
        assert why in str(e.value), str(e.value)
    with pytest.raises(AppError, match='Value 500 is greater than maximum value 50'):
        api.call('mistakes', 500, 'layer3', 0.5)
    labels, _ = classify(api, good, 'layer3', PREDICTED)  # and it still serves
    assert same(labels, expect(model, good))
    # The server's log: a line for each request the app refused, not a traceback through app.py (Gradio's own
    # value checks above print theirs, inside Gradio).
    log = server.log.read_text()
    assert log.count('app.py: refused a request: ') >= 5 and f'{ROOT / "app.py"}", line' not in log, log[-3000:]


def test_odd_images_are_read_as_the_picture_they_show(server, tmp_path, model):
    "An animated GIF and a multi-page TIFF by their first frame, 16-bit grey by its top 8 bits, CMYK by its RGB."
    api = Api(server.url)
    rng = np.random.default_rng(1)
    # Few colours, so that the GIF's palette keeps them exactly.
    first, second = (rng.choice(np.array([[255, 0, 0], [0, 90, 255], [250, 250, 0], [20, 20, 20]], np.uint8),
                                (24, 24)) for _ in range(2))
    frames = [Image.fromarray(f) for f in (first, second)]
    assert not same(expect(model, first), expect(model, second))  # so that reading the wrong frame would show
    for name in ('moving.gif', 'pages.tif'):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        assert Image.open(tmp_path / name).n_frames == 2
        assert same(classify(api, tmp_path / name, 'layer3', PREDICTED)[0], expect(model, first)), name
    grey = rng.integers(0, 256, (30, 30), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'deep.png')  # 16 bits a pixel, the same picture
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I')
    assert same(classify(api, tmp_path / 'deep.png', 'layer3', PREDICTED)[0], expect(model, np.stack([grey] * 3, -1)))
    rgb = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'print.tif')
    assert same(classify(api, tmp_path / 'print.tif', 'layer3', PREDICTED)[0], expect(model, rgb))


def test_concurrent_requests_answer_as_alone(tiny_run):
    "8 clients at once, each its own image, Grad-CAM layer and class, then the misclassified gallery at 4 layers."
    need_app()
    numbers = load_test(tiny_run, clients=8, requests=3, gallery=2, gallery_n=5, say=lambda s: None)
    for phase in ('classify_load', 'mistakes_load'):
        [load] = numbers[phase]
        assert load['errors'] == 0, load['first_errors']
        assert load['different_from_alone'] == 0
        assert load['n'] == 8 * (3 if phase == 'classify_load' else 2)


def copy_without_data(run, tmp_path, monkeypatch, drop=()):
    "A copy of `run` whose data folder is gone, with no $CIFAR10_DIR either: a run folder alone on another machine."
    monkeypatch.setenv('CIFAR10_DIR', str(tmp_path / 'also-gone'))
    return run_alone(run, tmp_path / 'copied-run', drop)


def kept_captions(run, model, n):
    "The captions of the gallery's `n` pictures, from the run's own mistakes.npz, in-process."
    from cams import misclassified_cams
    from run_folder import load_mistakes
    interp, worst = load_mistakes(run)
    return [caption for *_, caption in misclassified_cams(model[0], interp, n, 'layer3', x=worst)]


def first_gallery(server, n=10):
    "The gallery's captions and the seconds its first answer took, over HTTP."
    api, t = Api(server.url), time.perf_counter()
    got = mistakes(api, n, 'layer3')
    return [caption for caption, _ in got], time.perf_counter() - t


def test_without_the_data_set_it_classifies_and_shows_the_mistakes_the_run_kept(tiny_run, tmp_path, monkeypatch,
                                                                                model):
    "A run folder alone (no data folder, no $CIFAR10_DIR): images classify, the gallery answers from mistakes.npz."
    need_app()
    from app import serving
    run = copy_without_data(tiny_run, tmp_path, monkeypatch)
    want = kept_captions(run, model, 10)
    assert len(want) == 10 and len(set(want)) > 1
    with serving(run, log=tmp_path / 'app.log') as s:
        got, seconds = first_gallery(s)
        assert got == want and seconds < 2, (seconds, got)
        example = sorted((run / 'examples').glob('*.png'))[0]
        assert same(classify(Api(s.url), example, 'layer2', PREDICTED)[0], expect(model, example))
    # With --data the same file, as fast: the test set is not read.
    with serving(run, log=tmp_path / 'app-data.log', args=['--data', tiny_run.parent / 'data']) as s:
        got, seconds = first_gallery(s)
        assert got == want and seconds < 2, (seconds, got)


def test_a_run_without_mistakes_npz_needs_the_data_set_for_the_gallery(tiny_run, tmp_path, monkeypatch, model):
    "A run made before runs kept mistakes.npz, alone: images classify, the gallery says why not; --data: it answers."
    need_app()
    from app import serving
    run = copy_without_data(tiny_run, tmp_path, monkeypatch, drop=['mistakes.npz'])
    with serving(run, log=tmp_path / 'app.log') as s:
        api = Api(s.url)
        example = sorted((run / 'examples').glob('*.png'))[0]
        with pytest.raises(AppError, match='the misclassified test images need the test set'):
            mistakes(api, 5, 'layer3')
        assert same(classify(api, example, 'layer2', PREDICTED)[0], expect(model, example))
    # With --data it reads the test set once (interpret.kept_mistakes, as run.py's file) and answers.
    with serving(run, log=tmp_path / 'app-data.log', args=['--data', tiny_run.parent / 'data']) as s:
        got = [caption for caption, _ in mistakes(Api(s.url), 5, 'layer3')]
    assert len(got) == 5 and all(c.startswith('true c') for c in got), got


def test_with_tta_it_answers_with_mirror_tta(tiny_run, tmp_path, model):
    need_app()
    from app import serving
    img = tmp_path / 'x.png'
    picture(img, seed=3)
    with serving(tiny_run, log=tmp_path / 'app.log', args=['--tta']) as s:
        got = classify(Api(s.url), img, 'layer3', PREDICTED)[0]
    assert same(got, expect(model, img, tta=True)) and not same(got, expect(model, img)), got


@pytest.mark.parametrize('flag', LIMITS)
def test_an_impossible_limit_is_one_line(capsys, tiny_run, flag):
    code, err = run_here(capsys, 'app.py', '--run', tiny_run, f'--{flag}', 0)
    assert code == 2 and err == f'app.py: error: --{flag} must be at least 1, got 0\n'


def test_a_picture_sent_to_two_requests_at_once_is_never_half_written(tmp_path):
    "One picture saved by several requests as a client reads it: every read is the whole file (app.atomic_image_cache)."
    need_app()
    import threading
    from gradio import processing_utils as pu
    from app import atomic_image_cache
    atomic_image_cache()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    path = Path(pu.save_pil_to_cache(img, tmp_path, format='png'))
    size, stop, short = path.stat().st_size, threading.Event(), []
    def write():
        while not stop.is_set(): pu.save_pil_to_cache(img, tmp_path, format='png')
    def read():  # as a file response does: the size first (its Content-Length), then the bytes
        for _ in range(20_000): short.append(os.stat(path).st_size != size)
    writers = [threading.Thread(target=write) for _ in range(3)]
    for w in writers: w.start()
    read()
    stop.set()
    for w in writers: w.join()
    assert not any(short), f'{sum(short)} of {len(short)} reads were cut short'


def test_the_heap_is_bounded_where_glibc_allows():
    "app.py's `steady_heap` sets glibc's arena limit and mmap threshold (mallopt accepts both) on Linux with glibc."
    import platform
    # In a process of its own: it changes the allocator of the process that calls it.
    r = run_script('-c', 'import app; print(app.steady_heap())')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(platform.libc_ver()[0] == 'glibc')


def test_a_broken_mistakes_file_is_one_line(tiny_run, tmp_path, capsys):
    need_app()
    run = tmp_path / 'run'
    shutil.copytree(tiny_run, run)
    (run / 'mistakes.npz').write_bytes(b'not a zip file')
    code, err = run_here(capsys, 'app.py', '--run', run)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f'app.py: error: {run / "mistakes.npz"} is not a mistakes file ('), err


def test_the_kept_mistakes_are_the_worst_and_their_inputs(tiny_run):
    "mistakes.npz holds the highest-loss mistakes, highest first, with their inputs as the test pipeline makes them."
    import torch
    from interpret import interpret, top_misclassified
    from run_folder import load_mistakes, load_run
    kept, x = load_mistakes(tiny_run)
    idx = top_misclassified(kept, 50)
    assert np.array_equal(np.load(tiny_run / 'mistakes.npz')['idx'], idx.numpy()) and len(x) == len(idx) > 1
    interp = interpret(load_run(tiny_run, tiny_run.parent / 'data', 'cpu'))  # the inputs do not depend on precision
    assert torch.allclose(interp[idx][0], x, atol=1e-6)
