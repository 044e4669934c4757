"""The network is the assignment's, exactly: its summary table row for row, named blocks, residual adds, no biases."""
import os, re
from pathlib import Path

import pytest
import torch
from torch import nn

from arch import BLOCKS, custom_resnet, model_summary, write_summary
from conftest import skip_or_fail

HERE = Path(__file__).parent
EXPECTED = (HERE / 'data' / 'assignment_summary.txt').read_text().rstrip('\n')
ASSIGNMENT = Path(os.environ.get('ASSIGNMENT_MD', HERE.parents[1] / 'shared' / 'assignment.md'))


def test_summary_matches_the_assignment_table_exactly():
    assert model_summary(custom_resnet()) == EXPECTED


def test_expected_table_is_the_one_in_the_assignment():
    if not ASSIGNMENT.exists(): skip_or_fail(f'{ASSIGNMENT} not found (set ASSIGNMENT_MD)')
    block = re.search(r'MODEL SUMMARY\*\*\s*```\n(.*?)\n```', ASSIGNMENT.read_text(), re.S).group(1)
    assert block.rstrip('\n') == EXPECTED


def test_summary_has_29_layer_rows_and_writes_a_file(tmp_path):
    rows = [l for l in model_summary(custom_resnet()).splitlines() if re.match(r'\s+\w+-\d+\s', l)]
    assert len(rows) == 29 and rows[0].split()[0] == 'Conv2d-1' and rows[-1].split()[0] == 'Linear-29'
    f = write_summary(custom_resnet(), tmp_path)
    # The assignment's table byte for byte, then a blank line and the receptive-field table (tests/test_receptive.py).
    assert f.name == 'summary.txt' and f.read_text().startswith(EXPECTED + '\n\n' + '-' * 64 + '\n')
    assert 'Layer (type)   Output size   Jump' in f.read_text()


def test_parameter_count_and_no_biases():
    m = custom_resnet()
    assert sum(p.numel() for p in m.parameters()) == 6_573_120
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)): assert mod.bias is None


def test_named_blocks_and_logits():
    m = custom_resnet()
    assert [n for n, _ in m.named_children()] == [*BLOCKS, 'head']
    out = m.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out.softmax(-1).sum(-1), out.sum(-1))  # logits, not probabilities


@pytest.mark.parametrize('layer,c_in,size', [('layer1', 64, 32), ('layer3', 256, 8)])
def test_residual_layers_output_x_plus_r(layer, c_in, size):
    block = getattr(custom_resnet().eval(), layer)
    x = torch.randn(2, c_in, size, size)
    with torch.no_grad():
        X = block.conv(x)
        expected = X + block.res.res(X.clone())
        assert torch.allclose(block(x), expected, atol=1e-6)
        assert not torch.allclose(block(x), X)


def test_summary_leaves_mode_and_device_alone():
    m = custom_resnet().train()
    model_summary(m)
    assert m.training
