"""predict(): the model's own probabilities for any image, prepared as the test set is; cams.py --image end to end."""
import json, re, shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastcore.script import anno_parser
from PIL import Image

from arch import custom_resnet
from cli import UsageError
from conftest import CLASSES, run_script
from predict import CIFAR10_CLASSES, Prediction, network_view, predict, preprocess, read_image
from run_folder import load_model


@pytest.fixture(scope='module')
def model():
    "A seeded custom_resnet with its head scaled up: untrained, every probability would be about 0.1."
    torch.manual_seed(0)
    m = custom_resnet().eval()
    with torch.no_grad(): m.head.fc.weight *= 30
    return m


def image(w, h, mode='RGB', seed=0):
    "A random PIL image of size w×h in `mode`."
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a, 'RGBA').convert(mode)


# ---- predict() -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('k', [1, 3, 10, 25])
def test_top_k_are_the_softmax_of_the_scaled_logits(model, k):
    img = image(40, 50)
    got = predict(model, img, CLASSES, k=k)
    # the run's loss: softmax(logits/8)
    with torch.no_grad(): probs = F.softmax(model(preprocess(img)) * 0.125, dim=1)[0]
    order = probs.argsort(descending=True)[:k]
    assert len(got) == min(k, 10) and all(isinstance(p, Prediction) for p in got)
    assert [p.label for p in got] == [CLASSES[i] for i in order]
    assert torch.allclose(torch.tensor([p.prob for p in got]), probs[order], atol=1e-6)
    assert all(a.prob >= b.prob for a, b in zip(got, got[1:])) and sum(p.prob for p in got) <= 1 + 1e-6
    if k >= 10: assert sum(p.prob for p in got) == pytest.approx(1, abs=1e-5)


def test_any_kind_of_image_gives_the_same_input(model, tmp_path):
    img = image(32, 32)
    img.save(tmp_path / 'a.png')
    a = np.array(img)
    kinds = [tmp_path / 'a.png', str(tmp_path / 'a.png'), img, a, a / 255, torch.from_numpy(a),
             torch.from_numpy(a / 255).float()]
    ref = preprocess(img)
    for kind in kinds: assert torch.allclose(preprocess(kind), ref, atol=1e-6), type(kind)
    assert predict(model, a, CLASSES) == predict(model, tmp_path / 'a.png', CLASSES)


@pytest.mark.parametrize('w,h,mode,ext', [(100, 60, 'RGB', 'jpg'), (100, 60, 'L', 'png'), (100, 60, 'RGBA', 'png'),
                                          (60, 100, 'P', 'png'), (7, 300, 'LA', 'png'), (1000, 800, 'CMYK', 'jpg')])
def test_any_size_and_mode_becomes_one_32x32_rgb_input(model, tmp_path, w, h, mode, ext):
    path = tmp_path / f'img.{ext}'
    image(w, h, mode).save(path)
    view, x = network_view(path), preprocess(path)
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert len(predict(model, path, CLASSES)) == 3


def test_normalized_exactly_as_the_test_pipeline(tiny_run):
    "A 32×32 test image gives, bit for bit, the tensor that the run's own test DataLoader gives."
    from data import cifar_dls, scan_folder
    data = json.loads((tiny_run / 'config.json').read_text())['data']
    x = cifar_dls(data, bs=20, device='cpu', verbose=False).valid.one_batch()[0]
    files = scan_folder(tiny_run.parent / 'data')[1]['test'][0]
    assert len(files) == len(x) == 20
    ours = torch.cat([preprocess(f) for f in files])
    assert torch.allclose(ours, x.as_subclass(torch.Tensor), atol=1e-6)


def test_eval_mode_is_used_and_the_mode_restored(model):
    img = image(32, 32, seed=1)
    want = predict(model, img, CLASSES, k=10)
    model.train()
    try:
        assert predict(model, img, CLASSES, k=10) == want  # BatchNorm's running statistics, not the image's own
        assert model.training
    finally: model.eval()


@pytest.mark.parametrize('img,message', [
    (np.zeros((32, 32, 3)) + 255., 'a float image must be in [0, 1]'),
    (np.zeros((3, 32, 32), np.uint8), 'channels last'),
    (np.zeros((32, 32, 3), np.int64), 'must be uint8 or float'),
])
def test_arrays_it_cannot_take(model, img, message):
    with pytest.raises(UsageError, match=re.escape(message)): predict(model, img, CLASSES)


def test_class_names_must_match_the_model(model):
    with pytest.raises(UsageError, match='10 outputs but 3 class names'): predict(model, image(32, 32), ['a', 'b', 'c'])


def test_unreadable_files(tmp_path):
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    image(64, 64).save(tmp_path / 'whole.jpg')
    (tmp_path / 'cut.jpg').write_bytes((tmp_path / 'whole.jpg').read_bytes()[:300])
    for path, message in [(tmp_path / 'nope.png', 'does not exist'), (tmp_path, 'is a folder, not an image file'),
                          (tmp_path / 'junk.png', 'cannot be read'), (tmp_path / 'cut.jpg', 'cannot be read')]:
        with pytest.raises(UsageError, match=message): read_image(path)


def test_too_many_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    image(100, 80).save(tmp_path / 'big.png')
    with pytest.raises(UsageError, match=r'big.png is 100×80 pixels, over the limit of 5,000 pixels'):
        read_image(tmp_path / 'big.png', max_pixels=5000)
    assert read_image(tmp_path / 'big.png', max_pixels=8000).size == (100, 80)
    # PIL's own guard (twice its MAX_IMAGE_PIXELS) fires in open(), before ours: the message names the limit it met.
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    for max_pixels, limit in [(None, '2,000'), (10**9, '2,000'), (1500, '1,500')]:
        with pytest.raises(UsageError, match=f'big.png is over the limit of {limit} pixels'):
            read_image(tmp_path / 'big.png', max_pixels=max_pixels)


# ---- a run folder's model and classes ---------------------------------------------------------------------------

def test_a_run_records_its_classes_and_loads_without_its_data(tiny_run, tmp_path):
    assert json.loads((tiny_run / 'config.json').read_text())['classes'] == CLASSES
    run = tmp_path / 'run'  # a copy whose data folder is gone
    run.mkdir()
    for f in ('config.json', 'model.pth'): shutil.copy(tiny_run / f, run)
    config = json.loads((run / 'config.json').read_text())
    (run / 'config.json').write_text(json.dumps({**config, 'data': str(tmp_path / 'gone')}))
    model, classes = load_model(run, device='cpu')
    assert classes == CLASSES and not model.training
    assert {p.label for p in predict(model, image(50, 50), classes)} <= set(CLASSES)


def test_older_runs_without_classes(tiny_run, tmp_path):
    "Without `classes` in config.json: the data folder's names, else CIFAR-10's for 10 outputs, else an error."
    config = json.loads((tiny_run / 'config.json').read_text())
    del config['classes']
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(tiny_run / 'model.pth', run)
    (run / 'config.json').write_text(json.dumps(config))
    assert load_model(run, device='cpu')[1] == CLASSES  # read from its data folder's class folders
    (run / 'config.json').write_text(json.dumps({**config, 'data': str(tmp_path / 'gone')}))
    assert load_model(run, device='cpu')[1] == list(CIFAR10_CLASSES)
    torch.save(custom_resnet(3).state_dict(), run / 'model.pth')
    with pytest.raises(UsageError, match='records no class names'): load_model(run, device='cpu')


# ---- cams.py --image ----------------------------------------------------------------------------------------------

LINE = re.compile(r'^(\S+): (\w+) ([01]\.\d{3}), (\w+) ([01]\.\d{3}), (\w+) ([01]\.\d{3}) \(Grad-CAM: (\S+)\)$')


def test_cams_image_end_to_end(tiny_run, tmp_path):
    a, b = tmp_path / 'a.png', tmp_path / 'pics' / 'b.jpg'
    b.parent.mkdir()
    image(100, 60, 'RGBA').save(a)
    image(50, 80, 'L').save(b)
    r = run_script('cams.py', '--image', a, '--image', b, '--run', tiny_run)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, img, fig in zip(lines, (a, b), (tmp_path / 'a.gradcam.png', tmp_path / 'pics' / 'b.gradcam.png')):
        m = LINE.match(line)
        assert m, line
        assert m[1] == str(img) and m[8] == str(fig) and fig.exists()  # beside the image
        assert {m[2], m[4], m[6]} <= set(CLASSES)
        probs = [float(m[i]) for i in (3, 5, 7)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0005
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.gradcam.png', 'a.png', 'pics']


def test_image_flag_repeats_and_takes_several():
    import cams
    args = anno_parser(cams.main.__wrapped__).parse_args(['--image', 'a.png', 'b.png', '--image', 'c.jpg'])
    assert args.image == ['a.png', 'b.png', 'c.jpg'] and args.target is None


def test_target_adds_its_own_cam_and_out_collects_the_figures(tiny_run, tmp_path, capsys):
    import cams
    image(100, 60).save(tmp_path / 'a.png')
    cams.main(image=[str(tmp_path / 'a.png')], run=str(tiny_run), out=str(tmp_path / 'one'))
    cams.main(image=[str(tmp_path / 'a.png')], run=str(tiny_run), out=str(tmp_path / 'two'), target='c3',
              layer='layer2')
    one, two = tmp_path / 'one' / 'a.gradcam.png', tmp_path / 'two' / 'a.gradcam.png'
    assert not (tmp_path / 'a.gradcam.png').exists()
    w1, w2 = Image.open(one).size[0], Image.open(two).size[0]
    assert w2 == pytest.approx(w1 * 3 / 2, rel=0.02)  # input, predicted class's CAM, and now the target's CAM
    assert capsys.readouterr().out.count('(Grad-CAM: ') == 2


def test_a_bad_image_is_a_one_line_error(tiny_run, tmp_path):
    r = run_script('cams.py', '--image', tmp_path / 'nope.jpg', '--run', tiny_run)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert r.stderr.strip().splitlines() == [f'cams.py: error: image {tmp_path / "nope.jpg"} does not exist']


@pytest.mark.parametrize('make,kwargs,message', [
    (None, dict(image=['nope.png']), 'nope.png does not exist'),
    (None, dict(image=['.']), 'is a folder, not an image file'),
    ('junk.png', dict(image=['junk.png']), 'junk.png cannot be read (UnidentifiedImageError'),
    ('a.png', dict(image=['a.png'], target='zebra'),
     "--target 'zebra' is not a class of this run; choose one of c0, c1, c2, c3, c4, c5, c6, c7, c8, c9"),
    ('a.png', dict(image=['a.png', 'a.jpg']), 'a.jpg does not exist'),  # every image is checked before any work
    ('a.png', dict(image=['a.png'], layer='layer9'), 'choose one of prep, layer1, layer2, layer3'),
    ('a.png', dict(image=['a.png'], compare_layers=True), '--compare-layers is for a run'),
    (None, dict(target='c3'), '--target needs --image'),
])
def test_mistakes_are_one_line_errors(tiny_run, tmp_path, monkeypatch, capsys, make, kwargs, message):
    import cams
    monkeypatch.chdir(tmp_path)
    if make == 'junk.png': (tmp_path / make).write_bytes(b'\x89PNG but not really')
    elif make: image(40, 40).save(tmp_path / make)
    with pytest.raises(SystemExit) as e: cams.main(run=str(tiny_run), **kwargs)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob('*.gradcam.png'))


def test_two_images_drawn_to_one_file(tiny_run, tmp_path, capsys):
    import cams
    for ext in ('png', 'jpg'): image(40, 40).save(tmp_path / f'a.{ext}')
    with pytest.raises(SystemExit):
        cams.main(image=[str(tmp_path / 'a.png'), str(tmp_path / 'a.jpg')], run=str(tiny_run))
    assert 'would both be drawn to' in capsys.readouterr().err and not (tmp_path / 'a.gradcam.png').exists()


def test_a_run_records_its_logit_scale_and_predict_uses_it(tiny_run, tmp_path):
    config = json.loads((tiny_run / 'config.json').read_text())
    assert config['logit_scale'] == 0.125  # what run.py's loss multiplied the logits by
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(tiny_run / 'model.pth', run)
    img = image(32, 32)
    for recorded, scale in [(1.0, 1.0), (0.5, 0.5), (None, 0.125)]:  # no key: a run from before it was recorded
        (run / 'config.json').write_text(json.dumps({**config, 'logit_scale': recorded} if recorded else
                                                    {k: v for k, v in config.items() if k != 'logit_scale'}))
        model, classes = load_model(run, device='cpu')
        with torch.no_grad(): probs = F.softmax(model(preprocess(img)) * scale, dim=1)[0]
        got = predict(model, img, classes, k=10)
        assert [p.prob for p in got] == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-6)


def test_cams_explains_a_run_with_its_own_logit_scale(tiny_run, tmp_path):
    from run_folder import load_run
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(tiny_run / 'model.pth', run)
    config = json.loads((tiny_run / 'config.json').read_text())
    (run / 'config.json').write_text(json.dumps({**config, 'logit_scale': 0.5}))
    assert load_run(run, device='cpu').loss_func.scale == 0.5
