"""Grad-CAM is provably right (a network solved by hand, a textbook implementation), clean; cams.py works end to end."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arch import custom_resnet
from cams import gradcam
from conftest import run_here, run_script


def no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in model.modules())


def textbook(model, x, layer, target):
    "Grad-CAM as the papers write it, with plain backward() and retain_grad(): an independent reference."
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.setdefault('a', o))
    model.eval()
    logits = model(x)
    h.remove()
    a = store['a']
    a.retain_grad()
    logits[torch.arange(len(x)), target].sum().backward()
    w = a.grad.mean((2, 3), keepdim=True)
    cam = F.relu((w * a).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode='bilinear', align_corners=False)[:, 0]
    lo, hi = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return ((cam - lo) / (hi - lo)).nan_to_num(0.)  # the textbook divides 0 by 0 on an all-zero map


@pytest.fixture(scope='module')
def trained():
    "custom_resnet after a few steps on random data, so its maps are not those of an untrained net."
    torch.manual_seed(0)
    m = custom_resnet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad(); F.cross_entropy(m(x), y).backward(); opt.step()
    return m


@pytest.mark.parametrize('layer,size', [('layer3', 4), ('layer2', 8), ('layer1', 16), ('prep', 32)])
def test_shape_range_and_no_hooks_left(trained, layer, size):
    x = torch.randn(5, 3, 32, 32)
    cam = gradcam(trained, x, trained.get_submodule(layer))
    assert cam.shape == (5, 32, 32) and torch.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() <= 1
    assert torch.allclose(cam.amax((1, 2)), torch.ones(5))  # min-max scaled per image
    assert no_hooks(trained)


@pytest.mark.parametrize('layer', ['layer3', 'layer2'])
def test_matches_a_textbook_gradcam(trained, layer):
    m = copy.deepcopy(trained)
    x = torch.randn(8, 3, 32, 32)
    target = m.eval()(x).argmax(1)
    ours = gradcam(m, x, m.get_submodule(layer), target)
    ref_model = copy.deepcopy(trained)
    assert torch.allclose(ours, textbook(ref_model, x, ref_model.get_submodule(layer), target), atol=1e-5)
    assert (ours.amax((1, 2)) == 1).sum() >= 4  # most maps are real maps, not all-zero ones


def test_default_target_is_the_prediction(trained):
    x = torch.randn(4, 3, 32, 32)
    pred = trained.eval()(x).argmax(1)
    assert torch.equal(gradcam(trained, x, trained.layer3), gradcam(trained, x, trained.layer3, pred))


def test_hooked_layer_followed_by_an_inplace_relu(trained):
    "A BN whose output the next in-place ReLU overwrites gives the map of the same net with out-of-place ReLUs."
    plain = copy.deepcopy(trained)
    for mod in plain.modules():
        if isinstance(mod, nn.ReLU): mod.inplace = False
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    bn = 'layer3.conv.2'  # Conv → MaxPool → BN → ReLU(inplace=True)
    assert isinstance(trained.get_submodule(bn), nn.BatchNorm2d)
    assert torch.allclose(gradcam(trained, x, trained.get_submodule(bn), t),
                          textbook(plain, x, plain.get_submodule(bn), t), atol=1e-5)


def test_x_goes_to_the_models_device(trained):
    "fastai's Interpretation returns its images on the CPU while the model may sit on a GPU (seen on an H100)."
    m = copy.deepcopy(trained).to('meta')  # a device other than x's that any machine has
    cam = gradcam(m, torch.randn(2, 3, 32, 32), m.layer3, target=torch.tensor([1, 2]))
    assert cam.shape == (2, 32, 32) and cam.device.type == 'meta'


def test_mode_restored_and_hooks_removed_even_on_error(trained):
    for p in trained.parameters(): p.grad = None
    trained.train()
    with pytest.raises(RuntimeError): gradcam(trained, torch.randn(2, 3, 32, 32), trained.layer3, target=[99, 99])
    assert trained.training and no_hooks(trained)
    trained.eval()
    gradcam(trained, torch.randn(2, 3, 32, 32), trained.layer2)
    assert not trained.training
    assert all(p.grad is None for p in trained.parameters())  # no gradients left on the weights


class TinyNet(nn.Sequential):
    "features = x itself (an identity 1×1 conv), then global average pool and a linear layer: a CAM we can write down."
    def __init__(self, w):
        conv = nn.Conv2d(2, 2, 1, bias=False)
        conv.weight.data = torch.eye(2).view(2, 2, 1, 1)
        fc = nn.Linear(2, 2, bias=False)
        fc.weight.data = w
        super().__init__(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)


def test_a_network_solved_by_hand():
    # score_c = sum_k w[c,k] * mean(A_k), so dscore/dA_k = w[c,k]/(H·W) everywhere, the channel weight is
    # w[c,k]/(H·W), and the map is ReLU(sum_k w[c,k]·A_k)/(H·W), min-max scaled.
    w = torch.tensor([[1., -2.], [-1., 0.5]])
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 1, 1], x[0, 1, 1, 1], x[0, 1, 3, 3] = 4., 2., 1., 3.
    net = TinyNet(w)
    by_hand = F.relu(1. * x[0, 0] - 2. * x[0, 1])  # class 0: 4 at (0,0), 0 at (1,1), 0 at (3,3)
    cam = gradcam(net, x, net[0], target=0)[0]
    assert torch.allclose(cam, by_hand / by_hand.max())
    assert cam[0, 0] == 1 and cam[1, 1] == 0 and cam[3, 3] == 0


def test_all_negative_evidence_gives_zeros_not_nan():
    net = TinyNet(torch.tensor([[-1., -1.], [1., 1.]]))
    x = torch.rand(2, 2, 4, 4) + 0.1  # positive activations, negative weights for class 0: ReLU of a negative sum
    cam = gradcam(net, x, net[0], target=0)
    assert torch.equal(cam, torch.zeros_like(cam))


def test_cams_end_to_end(tiny_run, tmp_path):
    out = tmp_path / 'figs'
    r = run_script('cams.py', '--n', 3, '--run', tiny_run, '--out', out, '--compare-layers')
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ['gradcam.png', 'gradcam_01.png', 'gradcam_02.png', 'gradcam_03.png', 'gradcam_layers.png',
                     'report.md']
    report = (out / 'report.md').read_text()
    assert '![gradcam](gradcam.png)' in report and '(gradcam_03.png)' in report
    r = run_script('cams.py', '--n', 2, '--run', tiny_run, '--out', out)  # again: the section is replaced
    assert r.returncode == 0, r.stderr
    assert (out / 'report.md').read_text().count('<!-- cams.py -->') == 1


def test_fewer_mistakes_than_n_draws_what_there_is(tiny_run, tmp_path):
    r = run_script('cams.py', '--n', 500, '--run', tiny_run, '--out', tmp_path)
    assert r.returncode == 0, r.stderr
    drawn = len(list(tmp_path.glob('gradcam_*.png')))
    assert 0 < drawn < 20 and f'only {drawn} misclassified' in r.stdout


@pytest.mark.parametrize('args,message', [
    (['--n', '0'], '--n must be at least 1'),
    (['--layer', 'layer9'], "choose one of prep, layer1, layer2, layer3"),
    (['--run', '/no/such/run'], '--run /no/such/run does not exist'),
    (['--device', 'nope'], "--device 'nope' is not a torch device"),  # was a traceback from torch.device
])
def test_bad_flags_are_one_line_errors(tiny_run, capsys, args, message):
    code, err = run_here(capsys, 'cams.py', *(['--run', tiny_run] if '--run' not in args else []), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_run_folder_without_a_model(tiny_run, tmp_path, capsys):
    (tmp_path / 'config.json').write_text((tiny_run / 'config.json').read_text())
    code, err = run_here(capsys, 'cams.py', '--run', tmp_path)
    assert code == 2 and 'has no model.pth' in err and len(err.strip().splitlines()) == 1


# ---- the pictures app.py shows ---------------------------------------------------------------------------------

def test_cam_overlay_blends_at_the_opacity_and_enlarges():
    import numpy as np
    from matplotlib import colormaps
    from cams import cam_overlay
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cam = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    assert np.array_equal(cam_overlay(img, cam, opacity=0), img) and np.array_equal(cam_overlay(img, None, 0.7), img)
    heat = np.rint(colormaps['jet'](cam)[..., :3] * 255)
    assert np.abs(cam_overlay(img, cam, opacity=1).astype(int) - heat).max() <= 1
    half = cam_overlay(img, cam, opacity=0.5).astype(int)
    assert np.abs(half - (img.astype(int) + heat) / 2).max() <= 1
    big = cam_overlay(img, cam, 0.5, scale=8)
    assert big.shape == (256, 256, 3) and big.dtype == np.uint8 and np.array_equal(big[::8, ::8], half)


def test_view_cam_is_gradcam_of_the_view(trained):
    import numpy as np
    from cams import view_cam
    from predict import to_input
    view = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for layer, target in (('layer3', None), ('layer1', 4)):
        want = gradcam(trained, to_input(view), trained.get_submodule(layer), target)[0].numpy()
        assert np.array_equal(view_cam(trained, view, layer, target), want)
    with pytest.raises(Exception, match='not a block'): view_cam(trained, view, 'head')


def test_misclassified_cams_are_the_top_losses_with_their_maps(tiny_run):
    import numpy as np
    from cams import misclassified_cams
    from run_folder import load_run
    from interpret import denorm, interpret, top_misclassified
    learn = load_run(tiny_run, device='cpu')
    interp = interpret(learn)
    got = misclassified_cams(learn.model, interp, 4, 'layer2')
    idx = top_misclassified(interp, 4)
    assert len(got) == len(idx) == 4
    x = interp[idx][0]
    cams = gradcam(learn.model, x, learn.model.layer2, interp.decoded[idx]).numpy()
    for (img, cam, caption), i, want_img, want_cam in zip(got, idx.tolist(), denorm(x), cams):
        assert img.dtype == np.uint8 and np.abs(img / 255 - want_img).max() < 1 / 255 and np.array_equal(cam, want_cam)
        assert caption.startswith(f'true {interp.vocab[int(interp.targs[i])]}, predicted '
                                  f'{interp.vocab[int(interp.decoded[i])]} (')
    assert len(misclassified_cams(learn.model, interp, 100)) == int((interp.decoded != interp.targs).sum())


def test_run_data_prefers_the_given_then_the_recorded_folder(tiny_run, tmp_path, monkeypatch):
    import json, shutil
    from run_folder import run_data
    recorded = json.loads((tiny_run / 'config.json').read_text())['data']
    assert run_data(tiny_run, 'elsewhere') == 'elsewhere' and run_data(tiny_run) == recorded
    moved = tmp_path / 'moved'  # a run copied to another machine, without its data folder
    moved.mkdir()
    shutil.copy(tiny_run / 'config.json', moved)
    (moved / 'config.json').write_text((moved / 'config.json').read_text().replace(recorded, str(tmp_path / 'gone')))
    monkeypatch.setenv('CIFAR10_DIR', str(tmp_path / 'cifar'))
    assert str(run_data(moved)) == str(tmp_path / 'cifar')
