"""experiments/cpu_bench.py: the CPU speed table's rows, and numbers that follow from what it timed."""
import json, shutil

import pytest

from conftest import make_folder, run_here, run_script

ROWS = ['plain PyTorch, fp32', 'plain PyTorch, bf16 + channels-last', 'suite, fp32']


@pytest.fixture(scope='module')
def bench(tmp_path_factory):
    "One bench on a tiny folder (5 batches of 10 a row, the first untimed), with the profile: (stdout, its JSON)."
    root = tmp_path_factory.mktemp('cpu-bench')
    data, out = make_folder(root / 'data', n_train=5, n_test=1), root / 'bench.json'
    r = run_script('experiments/cpu_bench.py', '--data', data, '--bs', 10, '--steps', 4, '--warmup', 1, '--profile-ops',
                   '--out', out)
    assert r.returncode == 0, r.stderr
    return r.stdout, json.loads(out.read_text())


def test_the_table_has_the_four_rows(bench):
    stdout, result = bench
    names = [r['name'] for r in result['rows']]
    assert names[:3] == ROWS and names[3] == f"suite, default (auto: {result['auto_precision']})" and len(names) == 4
    table = stdout[stdout.index('train img/s'):]
    for r in result['rows']:
        line = next(l for l in table.splitlines() if l.startswith(r['name']))
        assert f"{r['img_s']:.1f}" in line and f"{r['epochs24_s'] / 60:.1f} min" in line


def test_the_numbers_follow_from_the_timings(bench):
    _, result = bench
    base = result['rows'][1]
    for r in result['rows']:
        assert r['img_s'] == pytest.approx(10 / r['step_s'])
        # 24 epochs of 50,000 // 10 training steps and 10,000 test images each
        assert r['epochs24_s'] == pytest.approx(24 * (5000 * r['step_s'] + 10_000 / r['test_img_s']))
        assert f"{r['img_s'] / base['img_s']:.2f}x" in bench[0]


def test_the_profile_names_the_convolutions(bench):
    stdout, result = bench
    assert 'aten::convolution_backward' in stdout and result['matmul_gflop_s'] > 0
    assert [c['conv'] for c in result['convs']] == ['3->64 at 32x32', '64->128 at 32x32', '128->128 at 16x16',
                                                      '128->256 at 16x16', '256->512 at 8x8', '512->512 at 4x4']
    # one pass of 64->128 at 32x32 on a batch of 10: 2 × 10 × 128 × 64 × 9 × 32 × 32 FLOP
    assert result['convs'][1]['gflop'] == pytest.approx(2 * 10 * 128 * 64 * 9 * 32 * 32 / 1e9)


@pytest.mark.parametrize('flags, says', [(['--steps', '0'], '--steps and --warmup must be at least 1, got 0 and 2'),
                                         (['--data', '/no/such/folder'], 'does not exist')])
def test_one_line_errors(capsys, flags, says):
    code, err = run_here(capsys, 'experiments/cpu_bench.py', *flags)
    assert code == 2 and err.count('\n') == 1 and err.startswith('cpu_bench.py: error:') and says in err, err


def test_compile_without_a_c_compiler_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(shutil, 'which', lambda name: None)
    code, err = run_here(capsys, 'experiments/cpu_bench.py', '--compile')
    assert code == 2 and err.strip() == ('cpu_bench.py: error: --compile needs a C compiler (torch.compile builds its '
                                         'kernels with one): install gcc')
