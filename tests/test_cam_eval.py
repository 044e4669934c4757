"""cams.py --evaluate: each metric on a network whose evidence is known, the sanity checks, ours against the library."""
import json, sys, time

import pytest
import torch
from torch import nn

import cam_eval
from cam_eval import (auc, cam_maps, perturbation_curves, random_maps, road, sanity_verdicts, sobel_maps,
                      spearman)
from conftest import run_here, run_script


class Quadrant(nn.Module):
    "Class 0's logit reads only the top-left quadrant: a fine checkerboard in channel 0 there; class 1's is minus it."
    def __init__(self):
        super().__init__()
        self.block = nn.Identity()  # a place to hook, for the methods that need a layer
        checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 2. - 1
        self.register_buffer('checker', checker)
        self.w = nn.Parameter(torch.tensor(1.2))  # the whole quadrant: p ≈ 0.99; none of it: 0.5

    def forward(self, x):
        s = self.w * (self.block(x)[:, 0, :16, :16] * self.checker).mean((1, 2))
        return torch.stack([s, -s], 1)


@pytest.fixture(scope='module')
def known():
    "The network, 8 images that show its evidence (probability ≈ 0.99), and maps: the quadrant, inverted, random."
    torch.manual_seed(0)
    net = Quadrant().eval()
    x = torch.randn(8, 3, 32, 32) * 0.5
    x[:, 0, :16, :16] += 2 * net.checker
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[:16, :16] = True
    # Graded, not flat, so that no ties decide the order: the whole quadrant first, at random within each part.
    grade = torch.rand(8, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    quadrant = torch.where(inside, 0.5 + grade, grade)
    maps = {'quadrant': quadrant, 'inverted': 1 - quadrant, 'random': random_maps(8, 8, seed=2)}
    return net, x, torch.zeros(8, dtype=torch.long), maps


def test_deletion_and_insertion_rank_the_evidence_first(known):
    net, x, t, maps = known
    assert (cam_eval.probabilities(net, x, t) > 0.99).all()
    scores = {k: [auc(c).mean().item() for c in perturbation_curves(net, x, m, t)] for k, m in maps.items()}
    (dq, iq), (di, ii), (dr, ir) = scores['quadrant'], scores['inverted'], scores['random']
    assert dq < dr - 0.05 and dr < di - 0.05, scores    # deletion: lower is better
    assert iq > ir + 0.05 and ir > ii + 0.05, scores    # insertion: higher is better


def test_the_curves_start_and_end_where_they_should(known):
    net, x, t, maps = known
    deletion, insertion = perturbation_curves(net, x, maps['random'], t)
    assert deletion.shape == insertion.shape == (8, cam_eval.STEPS + 1)
    full = cam_eval.probabilities(net, x, t)
    assert torch.allclose(deletion[:, 0], full) and torch.allclose(insertion[:, -1], full)
    assert torch.allclose(deletion[:, -1], torch.full((8,), 0.5))       # every pixel at the data mean: no evidence
    assert (insertion[:, 0] < 0.6).all()                                # blurred: the checkerboard is gone
    assert torch.allclose(auc(torch.tensor([[0., 1.]])), torch.tensor([0.5]))


def test_road_ranks_the_evidence_first(known):
    pytest.importorskip('pytorch_grad_cam')
    net, x, t, maps = known
    scores = {k: road(net, x, m, t).mean().item() for k, m in maps.items()}
    assert scores['quadrant'] > scores['random'] + 0.1 and scores['random'] > scores['inverted'] + 0.1, scores


def test_road_is_pytorch_grad_cams_road_combined(known):
    "Our ROAD leaves out the probability before removal, which cancels: the value is ROADCombined's."
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    net, x, t, maps = known
    torch.manual_seed(5)
    want = ROADCombined(percentiles=[20, 40, 60, 80])(x, maps['random'].numpy(),
                                                      [ClassifierOutputSoftmaxTarget(0)] * 8, net)
    assert torch.allclose(road(net, x, maps['random'], t, seed=5), torch.as_tensor(want), atol=1e-5)


def test_spearman():
    a = torch.rand(3, 4, 4)
    assert torch.allclose(spearman(a, a * 3 + 1), torch.ones(3))
    assert torch.allclose(spearman(a, -a), -torch.ones(3))
    assert torch.allclose(spearman(a, a ** 3), torch.ones(3))        # ranks, not values
    assert spearman(a, torch.zeros(3, 4, 4)).isnan().all()           # a flat map has no order


@pytest.fixture(scope='module')
def run_model(tiny_run):
    from run_folder import load_model
    return load_model(tiny_run, 'cpu')[0]


@pytest.fixture(scope='module')
def test_inputs(tiny_run):
    from data import load_arrays
    _, arrays = load_arrays(tiny_run.parent / 'data', verbose=False)
    images, labels = arrays['test']
    return cam_eval.inputs(images), torch.as_tensor(labels)  # its 20 test images


def test_the_sanity_check_tells_sobel_edges_from_gradcam(run_model, test_inputs):
    "Sobel edges ignore the weights; Grad-CAM of the trained tiny run does not."
    pytest.importorskip('pytorch_grad_cam')
    x, _ = test_inputs
    target = cam_eval.logits(run_model, x).argmax(1)
    cascade, classes = cam_eval._sanity(run_model, x, target, ['layer3'], ['gradcam'], 10, 0)
    assert all(abs(s[0] - 1) < 1e-6 for s in cascade[('layer3', 'sobel')]), cascade[('layer3', 'sobel')]
    assert cascade[('layer3', 'gradcam')][0][0] < 0.5, cascade[('layer3', 'gradcam')]   # the head alone randomized
    r = {'blocks': ['layer3'], 'fails_above': cam_eval.FAILS_ABOVE,
         'sanity': {'randomization': {'layer3': {k[1]: [{'mean': s[0]} for s in v] for k, v in cascade.items()}},
                    'other_class': {'layer3': {k[1]: {'mean': s[0]} for k, s in classes.items()}}}}
    verdicts = sanity_verdicts(r)
    assert verdicts[('layer3', 'sobel')][2:] == (True, True) and verdicts[('layer3', 'gradcam')][2] is False


def test_randomized_resets_the_cascade_and_leaves_the_model(run_model):
    before = {k: v.clone() for k, v in run_model.state_dict().items()}
    m = cam_eval.randomized(run_model, 'layer3.conv')
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert all(torch.equal(v, before[k]) for k, v in run_model.state_dict().items())
    assert {'head.fc.weight', 'layer3.conv.0.weight', 'layer3.res.res.0.0.weight'} <= changed
    assert not {k for k in changed if k.startswith(('layer2', 'layer1', 'prep'))}
    assert not {k for k in changed if 'running' in k}


@pytest.mark.parametrize('layer', ['layer2', 'layer3'])
def test_our_gradcam_is_pytorch_grad_cams(run_model, test_inputs, layer):
    pytest.importorskip('pytorch_grad_cam')
    x, y = test_inputs
    ours = cam_maps('gradcam', run_model, x, [layer], y)[layer]
    theirs = cam_maps('pgc-gradcam', run_model, x, [layer], y)[layer]
    assert ours.shape == theirs.shape == (20, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()


def test_sobel_is_an_edge_map():
    x = torch.zeros(1, 3, 32, 32)
    x[..., 16:] = 3.                     # a vertical edge between columns 15 and 16
    m = sobel_maps(x)[0]
    assert m[:, 15:17].min() == 1 and m[:, :14].max() < 1e-6 and m[:, 18:].max() < 1e-6


def test_evaluate_end_to_end_on_a_tiny_run(tiny_run, tmp_path):
    pytest.importorskip('pytorch_grad_cam')
    t = time.perf_counter()
    r = run_script('cams.py', '--evaluate', '--run', tiny_run, '--n', 3, '--out', tmp_path)
    seconds = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-3000:]
    assert seconds < 60, seconds
    assert 'is the block to read Grad-CAM at' in r.stdout and 'Score-CAM left out' in r.stdout, r.stdout
    res = json.loads((tmp_path / 'cam_eval.json').read_text())
    assert res['n_images'] == 3 and res['blocks'] == ['prep', 'layer1', 'layer2', 'layer3']
    for b in res['blocks']:
        assert set(res['metrics'][b]) == {*cam_eval.METHODS, *cam_eval.BASELINES}
        for k, ms in res['metrics'][b].items():
            for metric in ('deletion', 'insertion', 'road'):
                s = ms[metric]
                assert s['n_images'] == 3 and s['ci95'][0] - 1e-9 <= s['mean'] <= s['ci95'][1] + 1e-9, (b, k, metric, s)
        assert all(len(v) == len(cam_eval.CASCADE) for v in res['sanity']['randomization'][b].values())
    rows = (tmp_path / 'cam_eval.csv').read_text().splitlines()
    assert rows[0].startswith('block,method,metric,mean') and len(rows) > 4 * 8 * 4
    assert (tmp_path / 'cam_eval.png').stat().st_size > 10_000
    report = (tmp_path / 'report.md').read_text()
    assert '## Do the explanations show what the network used?' in report and res['verdict'] in report


@pytest.mark.parametrize('args,message', [
    (['--image', 'x.png'], '--evaluate scores every block on the test set'),
    (['--layer', 'layer2'], '--evaluate scores every block on the test set'),
    (['--n', '1'], '--n must be at least 2 for --evaluate'),
])
def test_bad_flags_are_one_line(tiny_run, capsys, args, message):
    code, err = run_here(capsys, 'cams.py', '--evaluate', '--run', tiny_run, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_without_the_extra_it_says_how_to_install_it(tiny_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)  # `import pytorch_grad_cam` raises ImportError
    code, err = run_here(capsys, 'cams.py', '--evaluate', '--run', tiny_run)
    assert code == 2 and "pip install -c constraints.txt -e '.[cams]'" in err and len(err.strip().splitlines()) == 1
