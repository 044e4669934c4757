"""The effective receptive field: exact on a network solved by hand, and experiments/receptive_field.py on a run."""
import json, shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_here, run_script
from effective_rf import START, central_gradients, mass_radius
from report import marked, put_section


def ones_net():
    "Two 3×3 convolutions of ones, 1 channel to 2 to 1, as named blocks a and b: their input gradients are known."
    net = nn.Sequential(OrderedDict(a=nn.Conv2d(1, 2, 3, padding=1, bias=False),
                                    b=nn.Conv2d(2, 1, 3, padding=1, bias=False)))
    with torch.no_grad():
        for p in net.parameters(): p.fill_(1.)
    return net


def test_central_gradients_are_the_hand_solved_maps():
    x = torch.randn(5, 1, 9, 9)
    maps = central_gradients(ones_net(), x, blocks=('a', 'b'), bs=2)  # batches of 2, 2 and 1: still a mean over 5
    a, b = np.zeros((9, 9)), np.zeros((9, 9))
    a[3:6, 3:6] = 2  # the central unit of a, summed over its 2 channels: the 3×3 window around pixel (4, 4)
    tri = np.array([1, 2, 3, 2, 1.])
    b[2:7, 2:7] = 2 * np.outer(tri, tri)  # two 3×3 boxes in a row: a 5×5 pyramid, through 2 channels
    assert np.allclose(maps['a'], a) and np.allclose(maps['b'], b)


def test_mass_radius_grows_square_by_square():
    g = np.zeros((9, 9))
    g[4, 4], g[3, 5], g[0, 8] = 5, 3, 2  # the centre; a pixel at square-distance 1; a corner at distance 4
    assert [mass_radius(g, (4, 4), s) for s in (0.5, 0.8, 0.9, 1.0)] == [0, 1, 4, 4]
    assert mass_radius(g, (4.5, 4.5), 0.5) == 0.5  # a centre between pixels: the nearest ones are half a pixel off


def test_put_section_replaces_its_own_section_only(tmp_path):
    report = tmp_path / 'report.md'
    report.write_text('# Run\n\ntext\n')
    put_section(report, f'{START}\none\n<!-- /receptive_field -->')
    put_section(report, marked('other', ['other one']))
    put_section(report, f'{START}\ntwo\n<!-- /receptive_field -->')
    put_section(report, marked('other', ['other two']))
    text = report.read_text()
    assert text.startswith('# Run\n\ntext\n') and text.count(START) == 1 and 'two' in text and 'one' not in text
    assert text.index('\ntwo') < text.index('other two')  # each replaced where it was


def test_redraw_on_a_finished_run(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / 'run')  # the session's run stays as run.py left it
    before = json.loads((run / 'receptive_field.json').read_text())
    (run / 'receptive_field.png').unlink()
    r = run_script('experiments/receptive_field.py', '--run', run, '--n', 7, '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    after = json.loads((run / 'receptive_field.json').read_text())
    assert (run / 'receptive_field.png').exists() and after['n_images'] == 7 and before['n_images'] == 20
    assert [f['rf'] for f in after['blocks'].values()] == [3, 14, 20, 64]
    report = (run / 'report.md').read_text()
    assert report.count(START) == 1 and 'over 7 test images' in report \
        and '![receptive_field](receptive_field.png)' in report


@pytest.mark.parametrize('args,message', [
    (['--run', '/no/such/run'], '--run /no/such/run does not exist'),
    (['--n', '0'], '--n must be at least 1'),
    (['--device', 'nope'], "--device 'nope' is not a torch device"),
])
def test_bad_flags_are_one_line_errors(tiny_run, capsys, args, message):
    code, err = run_here(capsys, 'experiments/receptive_field.py',
                         *(['--run', tiny_run] if '--run' not in args else []), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_run_folder_without_a_model(tiny_run, tmp_path, capsys):
    (tmp_path / 'config.json').write_text((tiny_run / 'config.json').read_text())
    code, err = run_here(capsys, 'experiments/receptive_field.py', '--run', tmp_path)
    assert code == 2 and 'has no model.pth' in err and len(err.strip().splitlines()) == 1
