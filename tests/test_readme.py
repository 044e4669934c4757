"""The README's interactive snippet runs as written (on a tiny folder, a few steps), so it cannot rot."""
import re

from conftest import ROOT, run_script


def readme_snippet(data, bs, epochs, subset=None, find_iters=100):
    "The README's 'Interactive use' block, pointed at `data` with a smaller batch, subset, epoch count and finder."
    text = (ROOT / 'README.md').read_text()
    code = re.search(r'## Interactive use\s+```python\n(.*?)```', text, re.S).group(1)
    swaps = [("cifar_dls('data/cifar10', bs=512)", f"cifar_dls({str(data)!r}, bs={bs}, subset={subset})"),
             ('learn.fit_one_cycle(24,', f'learn.fit_one_cycle({epochs},'),
             ('learn.lr_find(suggest_funcs=', f'learn.lr_find(num_it={find_iters}, suggest_funcs=')]
    for old, new in swaps:
        assert code.count(old) == 1, f'the README snippet no longer has {old!r}; update this test with it'
        code = code.replace(old, new)
    # The snippet's last lines show figures; the check reads what they left behind.
    return code + '\nprint("device", dls.device, "lrmin", lrs.lrmin, "lrmax", lrs.lrmax, "epochs", len(learn.recorder.values))\n'


def run_snippet(code):
    "Run the snippet as a user at the project's root would, headless; the names it printed last, with their values."
    r = run_script('-c', f'import matplotlib; matplotlib.use("Agg")\n{code}')
    assert r.returncode == 0, r.stderr[-3000:]
    return dict(zip(*[iter(r.stdout.split('\n')[-2].split())] * 2))


def test_the_readme_snippet_runs(tiny):
    out = run_snippet(readme_snippet(tiny, bs=10, epochs=2, find_iters=30))
    assert 0 < float(out['lrmin']) < float(out['lrmax']) and out['epochs'] == '2'
