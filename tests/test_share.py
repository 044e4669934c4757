"""Sharing a run: its export.pkl via fastai's load_learner in a fresh process, and the package pieces app.py shows."""
import json, os, subprocess, sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT

# A user's session: nothing of the project imported by hand, only fastai's load_learner (which imports what it needs).
LOAD_AND_PREDICT = """
import json, sys, warnings
warnings.simplefilter('ignore')
from fastai.learner import load_learner
learn = load_learner(sys.argv[1], cpu=True)
with learn.no_bar(): out = [learn.predict(f) for f in sys.argv[2:]]
print(json.dumps([dict(label=str(label), idx=int(idx), probs=probs.tolist()) for label, idx, probs in out]))
"""


def images(folder):
    "Images of odd sizes and modes, as a user would bring them; and a 32×32 RGB one."
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 71, 4), dtype=np.uint8), 'RGBA')
    kinds = {'odd.jpg': rgba.convert('RGB'), 'grey.png': rgba.convert('L').resize((20, 130)),
             'alpha.png': rgba, 'palette.png': rgba.convert('P'), 'small.png': rgba.convert('RGB').resize((32, 32))}
    for name, im in kinds.items(): im.save(folder / name)
    return [folder / name for name in kinds]


def test_a_run_exports_a_learner_that_predicts_as_predict_does(tiny_run, tmp_path):
    from predict import predict
    from run_folder import load_model
    export = tiny_run / 'export.pkl'
    assert export.exists()
    # No training images inside: the export is the weights and little else. This run's 80 images are 245 KB.
    extra = export.stat().st_size - (tiny_run / 'model.pth').stat().st_size
    assert export.stat().st_size < 30e6 and extra < 150e3, extra
    files = images(tmp_path)
    # From a user's folder that holds a data/ folder, with the checkout on PYTHONPATH (docs/sharing.md): the pickle's
    # `arch`, `train` and `predict` are ours, not the installed arch package or the data/ folder.
    (tmp_path / 'data').mkdir()
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    r = subprocess.run([sys.executable, '-c', LOAD_AND_PREDICT, export, *files], cwd=tmp_path, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    model, classes = load_model(tiny_run, 'cpu')
    for f, g in zip(files, got):
        ref = predict(model, f, classes, k=len(classes))
        assert g['label'] == ref[0].label == classes[g['idx']], f.name
        probs = {p.label: p.prob for p in ref}
        assert np.allclose(g['probs'], [probs[c] for c in classes], atol=1e-5, rtol=0), f.name


def test_the_exported_learner_matches_predict_on_a_confident_model(tmp_path):
    "With probabilities far from uniform, `learn.predict` on paths, PIL images of any mode and arrays is `predict`."
    from fastai.learner import load_learner
    from arch import custom_resnet
    from predict import CIFAR10_CLASSES, export_learner, predict
    torch.manual_seed(0)
    model = custom_resnet().eval()
    with torch.no_grad(): model.head.fc.weight *= 100  # untrained, every probability would be about 0.1
    learn = load_learner(export_learner(model, CIFAR10_CLASSES, tmp_path / 'export.pkl'), cpu=True)
    files = images(tmp_path)
    items = [*files, *(Image.open(f) for f in files), np.asarray(Image.open(files[0]))]
    tops = []
    for item in items:
        with learn.no_bar(): label, idx, probs = learn.predict(item)
        ref = predict(model, item, CIFAR10_CLASSES, k=10)
        tops.append(ref[0].prob)
        assert label == ref[0].label
        want = torch.tensor([{p.label: p.prob for p in ref}[c] for c in CIFAR10_CLASSES])
        assert torch.allclose(probs, want, atol=1e-5, rtol=0)
    assert max(tops) > 0.2  # the probabilities compared above are not all 0.1


def test_the_exported_dls_holds_no_items_and_the_run_vocab(tiny_run):
    from fastai.learner import load_learner
    learn = load_learner(tiny_run / 'export.pkl', cpu=True)
    assert list(learn.dls.vocab) == json.loads((tiny_run / 'config.json').read_text())['classes']
    assert len(learn.dls.train_ds) == len(learn.dls.valid_ds) == 0
    assert type(learn.dls.train).__name__ == 'TfmdDL'  # not data.py's ArrayDL, which carries the dataset


# ---- what app.py shows, from the package ----------------------------------------------------------------------

def test_headline_reads_the_run(tmp_path):
    "The last epoch's test accuracy, the epochs done of those planned, the device: from the run's own files."
    from report import headline
    (tmp_path / 'config.json').write_text(json.dumps(dict(epochs=24, device='cuda:0', device_name='NVIDIA H100',
                                                          n_train=50000, n_test=10000)))
    rows = ['epoch,lr,train_loss,train_acc,test_loss,test_acc,seconds'] + \
           [f'{e},0.1,1.0,0.5,1.0,{acc},2.0' for e, acc in ((1, 0.5), (2, 0.71234), (3, 0.6))]
    (tmp_path / 'metrics.csv').write_text('\n'.join(rows) + '\n')
    assert headline(tmp_path) == ('test accuracy 60.00% after 3 of 24 epochs on cuda:0 (NVIDIA H100); '
                                  '50000 training and 10000 test images')


def test_test_examples_are_the_test_images_one_class_at_a_time(tiny_run, tmp_path):
    from data import cifar_dls, scan_folder
    from interpret import save_test_examples
    config = json.loads((tiny_run / 'config.json').read_text())
    dls = cifar_dls(config['data'], bs=20, device='cpu', verbose=False)
    paths = save_test_examples(dls.valid, tmp_path / 'ex', n=12)
    assert [p.name for p in paths[:3]] == ['01_c0.png', '02_c1.png', '03_c2.png'] and paths[10].name == '11_c0.png'
    files = scan_folder(tiny_run.parent / 'data')[1]['test'][0]  # sorted by class, then name: c0's first is first
    for p, f in ((paths[0], files[0]), (paths[10], files[1]), (paths[2], files[4])):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(f).convert('RGB'))), (p, f)
