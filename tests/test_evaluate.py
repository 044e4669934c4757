"""The final test numbers of a run: mirror TTA, the expected calibration error and NLL, and experiments/evaluate.py."""
import json, shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import precision
import predict as predict_module
from conftest import run_here, run_script
from interpret import calibration_bins, expected_calibration_error
from predict import evaluate, native_precision, predict, preprocess
from run_folder import load_model, load_run


def onehotish(top, conf, n=10):
    "A probability row with `conf` on class `top` and the rest spread evenly."
    row = torch.full((n,), (1 - conf) / (n - 1))
    row[top] = conf
    return row


def test_ece_solved_by_hand():
    # Bin 15 of 15 (14/15, 1]: two images at 0.95, one right: |0.5 − 0.95| = 0.45, weight 2/4.
    # Bin 8 (7/15, 8/15]: one at 0.5, right: 0.5, weight 1/4. Bin 5 (4/15, 5/15]: one at 0.3, right: 0.7, weight 1/4.
    probs = torch.stack([onehotish(0, .95), onehotish(0, .95), onehotish(1, .5), onehotish(2, .3)])
    targs = torch.tensor([0, 1, 1, 2])
    assert expected_calibration_error(probs, targs) == pytest.approx(0.5 * 0.45 + 0.25 * 0.5 + 0.25 * 0.7)
    count, conf, acc = calibration_bins(probs, targs)
    assert count.tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2]
    assert (conf[14], acc[14], acc[4]) == pytest.approx((0.95, 0.5, 1.0))
    # A perfectly calibrated set: each bin as accurate as it is confident.
    right = torch.stack([onehotish(0, .8)] * 5)
    assert expected_calibration_error(right, torch.tensor([0, 0, 0, 0, 3])) == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize('temperature', [0.5, 2.0, 6.0])
def test_ece_matches_torchmetrics(temperature):
    from torchmetrics.classification import MulticlassCalibrationError
    g = torch.Generator().manual_seed(int(10 * temperature))
    probs = F.softmax(temperature * torch.randn(5000, 10, generator=g), dim=1)
    for targs in (torch.multinomial(probs, 1, generator=g).flatten(),  # nearly calibrated
                  torch.randint(0, 10, (5000,), generator=g)):         # labels the probabilities know nothing of
        want = MulticlassCalibrationError(num_classes=10, n_bins=15, norm='l1')(probs, targs).item()
        assert expected_calibration_error(probs, targs) == pytest.approx(want, abs=1e-6)


def test_evaluate_mirror_tta_and_calibration_on_a_trained_run(tiny_run):
    data = tiny_run.parent / 'data'
    learn = load_run(tiny_run, data)  # fp32: the numbers of the run's own last epoch
    ev = evaluate(learn)
    model, s = learn.model.eval(), learn.loss_func.scale
    x, y = zip(*[(xb.cpu(), yb.cpu()) for xb, yb in learn.dls.valid])
    x, y = torch.cat(x).as_subclass(torch.Tensor), torch.cat(y).as_subclass(torch.Tensor)
    with torch.no_grad(): plain, mirrored = model(x), model(x.flip(-1))  # flip(-1): left to right
    assert torch.equal(ev.targs, y)
    # A one-epoch model's probabilities are near uniform, so the mirror moves them little: what it moved them by must
    # be a hundred times what separates fastai's passes from the same sums done here.
    moved = (ev.tta_probs - ev.probs).abs().max()
    assert (ev.probs - F.softmax(s * plain, 1)).abs().max() < moved / 100
    assert (ev.tta_probs - F.softmax(s * (plain + mirrored) / 2, 1)).abs().max() < moved / 100
    m = ev.metrics
    assert m['test_acc'] == pytest.approx((plain.argmax(1) == y).float().mean().item())
    assert m['test_acc_tta'] == pytest.approx(((plain + mirrored).argmax(1) == y).float().mean().item())
    assert m['nll'] == pytest.approx(F.cross_entropy(s * plain, y).item(), rel=1e-5)
    assert m['ece'] == pytest.approx(expected_calibration_error(F.softmax(s * plain, 1), y), abs=1e-6)
    assert m['n_images'] == len(y) == 20
    config = json.loads((tiny_run / 'config.json').read_text())
    assert config['test_metrics']['test_acc_tta'] == pytest.approx(m['test_acc_tta'])  # what run.py recorded


def test_predict_with_tta_is_the_mean_of_the_image_and_its_mirror(tiny_run):
    model, classes = load_model(tiny_run, 'cpu')
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = preprocess(img)
    with torch.no_grad(): want = F.softmax(model.logit_scale * (model(x) + model(x.flip(-1))) / 2, 1)[0]
    got = predict(model, img, classes, k=10, tta=True)
    assert [p.prob for p in got] == pytest.approx(want.sort(descending=True).values.tolist(), abs=1e-6)
    assert [p.label for p in got][:1] == [classes[int(want.argmax())]]
    # TTA sees an image and its mirror alike; without it the two differ.
    mirror = img[:, ::-1]
    assert [p.prob for p in predict(model, mirror, classes, k=10, tta=True)] == \
        pytest.approx([p.prob for p in got], abs=1e-6)
    assert predict(model, mirror, classes, k=10) != predict(model, img, classes, k=10)


def test_native_precision_is_fp32_where_bf16_would_be_emulated(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_bf16_unit', lambda: None)  # a CPU with AVX2 only
    assert native_precision('bf16', 'cpu') == 'fp32' and native_precision('fp32', 'cpu') == 'fp32'
    monkeypatch.setattr(precision, 'cpu_bf16_unit', lambda: 'AVX-512 BF16')
    assert native_precision('bf16', 'cpu') == 'bf16' and native_precision('fp32', 'cpu') == 'fp32'
    assert predict_module.auto_precision is precision.auto_precision  # the function patched above is the one used


def test_evaluate_command_records_the_numbers_once(tiny_run, tmp_path, capsys):
    run, data = shutil.copytree(tiny_run, tmp_path / 'run'), tiny_run.parent / 'data'
    recorded = json.loads((run / 'config.json').read_text())['test_metrics']
    (run / 'calibration.png').unlink()
    kept = np.load(run / 'mistakes.npz')  # run.py's, in the run's own precision
    (run / 'mistakes.npz').unlink()  # as a run made before runs kept it
    r = run_script('experiments/evaluate.py', '--run', run, '--data', data)
    assert r.returncode == 0, r.stderr
    m = json.loads((run / 'config.json').read_text())['test_metrics']
    for k in ('test_acc', 'test_acc_tta', 'nll', 'ece', 'n_images'):
        assert m[k] == pytest.approx(recorded[k], abs=1e-6), k
    assert m['precision'] == native_precision(recorded['precision'], 'cpu') and m['seconds'] > 0 \
        and 'cores' in m['device_name']
    assert f'{100 * m["test_acc_tta"]:.2f}% with mirror TTA' in r.stdout
    assert Image.open(run / 'calibration.png').size[0] >= 400
    # The app's gallery file, as run.py writes it: the same images, labels and worst mistakes (in the same precision).
    again = np.load(run / 'mistakes.npz')
    assert sorted(again.files) == sorted(kept.files)
    for k in ('vocab', 'targs', 'decoded', 'idx'): assert np.array_equal(again[k], kept[k]), k
    assert np.allclose(again['preds'], kept['preds'], atol=1e-5) and np.allclose(again['x'], kept['x'], atol=1e-6)
    assert run_here(capsys, 'experiments/evaluate.py', '--run', run, '--data', data)[0] in (0, None)
    report = (run / 'report.md').read_text()
    assert report.count('## Final test evaluation') == report.count('<!-- evaluation -->') == 1  # replaced, not added
    (run / 'calibration.png').unlink()
    before = {f: (run / f).read_bytes() for f in ('config.json', 'report.md', 'mistakes.npz')}
    assert run_here(capsys, 'experiments/evaluate.py', '--run', run, '--data', data, '--dry-run')[0] in (0, None)
    # --dry-run writes nothing: no figure drawn again, config.json (its timing too) and report.md untouched.
    assert not (run / 'calibration.png').exists() and all((run / f).read_bytes() == b for f, b in before.items())


@pytest.mark.parametrize('args, message', [
    (['--precision', 'fp16'], "evaluate.py: error: --precision must be one of native, fp32, bf16, got 'fp16'"),
    (['--run', 'no/such/run'], 'evaluate.py: error: --run no/such/run does not exist'),
])
def test_evaluate_command_bad_input_is_one_line(capsys, args, message):
    code, err = run_here(capsys, 'experiments/evaluate.py', *args)
    assert code == 2 and err.strip() == message, err


def test_cams_image_with_tta_prints_the_tta_probabilities(tiny_run, tmp_path, capsys, monkeypatch):
    import cams
    from cams import explain_images
    # A one-epoch model's TTA moves its probabilities by less than the printed 0.001: the call itself is watched too.
    asked = []
    monkeypatch.setattr(cams, 'predict', lambda *a, **kw: asked.append(kw.get('tta')) or predict(*a, **kw))
    img = tmp_path / 'x.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    model, classes = load_model(tiny_run, 'cpu')
    for tta in (False, True):
        explain_images([img], tiny_run, device='cpu', tta=tta)
        top = predict(model, img, classes, tta=tta)
        want = ', '.join(f'{p.label} {p.prob:.3f}' for p in top) + (' (mirror TTA)' if tta else '') + ' (Grad-CAM:'
        assert want in capsys.readouterr().out and asked[-1] is tta
    code, err = run_here(capsys, 'cams.py', '--run', tiny_run, '--tta')
    assert code == 2 and 'cams.py: error: --tta is for --image' in err, err
