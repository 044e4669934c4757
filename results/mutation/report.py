"""Turn mutmut's results into results/mutation/README.md: the score of each module, and every surviving mutant with why.

Run from the checkout's root after `mutmut run ...` (README, Tests): python results/mutation/report.py
"""
import re, subprocess, sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).parent
MUTMUT = [sys.executable, '-m', 'mutmut']

# Why a surviving mutant is equivalent (no test can tell it from the original), by mutant name.
EQUIVALENT = {
    'interpret.x_interpret__mutmut_8': "fastai's get_preds makes its own unshuffled copy of the loader (shuffle=None "
                                       'is False here)',
    'interpret.x_interpret__mutmut_10': "fastai's get_preds makes its own unshuffled copy of the loader (a validation "
                                        'loader is unshuffled anyway)',
    'interpret.x_interpret__mutmut_12': "fastai's get_preds puts the predictions back in dataset order "
                                        "(`reorder=True`) whatever the loader's shuffle",
    'interpret.x_interpret__mutmut_9': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'interpret.x_interpret__mutmut_11': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'interpret.x_interpret__mutmut_13': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'lrfind.x__loss_at__mutmut_10': "the LRs are floats already (fastai's float32 tensor, or a list of floats): only "
                                    "the log's precision changes, which moves the marker only if two recorded LRs are "
                                    'equally near in float32',
    'lrfind.x__loss_at__mutmut_12': "the LRs are floats already (fastai's float32 tensor, or a list of floats): only "
                                    "the log's precision changes, which moves the marker only if two recorded LRs are "
                                    'equally near in float32',
    'lrfind.x_suggest__mutmut_16': "fastai's four suggestion functions take num_it but none of them reads it",
    'lrfind.x_suggest__mutmut_24': "float('NAN') is float('nan')",
    'lrfind.x_find_lrs__mutmut_16': 'show_plot=None is as falsy as False: no plot either way',
    'lrfind.x_find_lrs__mutmut_17': "fastai's lr_find starts at 1e-7 by default, as find_lrs does",
    'lrfind.x_find_lrs__mutmut_18': "fastai's lr_find ends at 10 by default, as find_lrs does",
    'augment.x_batch_crop__mutmut_19': 'draws a third row of shifts that nothing reads; the two rows read are drawn '
                                       'alike',
    'augment.x_batch_crop__mutmut_26': '`_reflect` depends on |i| only, so s − i reads the rows of the crop at −s, and '
                                       'the shifts are drawn uniformly from a range symmetric about 0',
    'augment.x_batch_crop__mutmut_37': '`_reflect` depends on |i| only, so s − i reads the columns of the crop at −s, '
                                       'and the shifts are drawn uniformly from a range symmetric about 0',
    'augment.x_batch_crop__mutmut_57': "a float32 `torch.rand` equals flip_p with probability 2⁻²⁴: the flip's odds "
                                       'move by 6e-8',
    'augment.x_batch_cutout__mutmut_11': '`torch.randint(high, size)` is `torch.randint(0, high, size)`',
    'augment.x_batch_cutout__mutmut_25': '`torch.randint(high, size)` is `torch.randint(0, high, size)`',
    'augment.x_batch_cutout__mutmut_35': "a bool indicator times the other, in x's dtype, is promoted to x's dtype: "
                                         'the same mask',
    'augment.x_batch_cutout__mutmut_47': "a bool indicator times the other, in x's dtype, is promoted to x's dtype: "
                                         'the same mask',
    'augment.xǁPadCropFlipǁ__init____mutmut_4': "fastai's RandTransform applies itself when p == 1 or random() < p: "
                                                'always, for p = 1 and p = 2 alike',
    'augment.xǁCutoutǁ__init____mutmut_3': "fastai's RandTransform applies itself when p == 1 or random() < p: always, "
                                           'for p = 1 and p = 2 alike',
    'interpret.x_denorm__mutmut_9': 'a (3, 1, 1) tensor broadcasts against N×3×H×W exactly as a (1, 3, 1, 1) one',
    'lrfind.x_curve_rule__mutmut_36': 'with a = 0 there is no vertex (the test is a > 0), whatever b and c are',
    'lrfind.x_curve_rule__mutmut_37': 'with a = 0 there is no vertex (the test is a > 0), whatever b and c are',
    'lrfind.x_curve_rule__mutmut_49': "differs only when a fitted vertex equals the window's lowest log-LR "
                                      'to the last bit',
    'lrfind.x_curve_rule__mutmut_50': "differs only when a fitted vertex equals the window's highest log-LR "
                                      'to the last bit',
}
# What is tested: all of augment.py and lrfind.py; train.py's learner and schedule (not its progress bar, bf16 callback,
# random streams or process-group helpers, which tests/test_speed.py, test_reliability.py and test_distributed.py
# check end to end); interpret.py without its two figure functions (layout: sizes, fonts, colours).
SCOPE = re.compile(r'augment\.|lrfind\.'
                   r'|train\.(xǁScaledCrossEntropyǁ|x_cifar_learner_|x_one_cycle_kwargs_|x_fit_assignment_)'
                   r'|interpret\.x_(interpret|top_misclassified|denorm|most_confused)_')
# mutmut's meaning of each exit status, summed as killed (a test failed or timed out) or not.
KILLED, SURVIVED = {'killed', 'timeout', 'segfault'}, {'survived', 'no tests', 'suspicious'}


def results():
    "mutmut's status of every mutant it has: {name: status}."
    out = subprocess.run(MUTMUT + ['results', '--all', 'true'], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r'^\s+(\S+): (.+)$', out, re.M))


def diff(name):
    "The mutant's change: its removed and added lines (mutmut's `show`, in this process: one process each is minutes)."
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    out = get_diff_for_mutant(name, path=Path(name.split('.')[0] + '.py'))
    return [l for l in out.splitlines() if re.match(r'^[-+](?![-+]{2} )', l)]


def docstring_only(lines):
    "True when the mutant changes nothing but a docstring (a line that is a lone string literal)."
    return bool(lines) and all(re.fullmatch(r'[-+]\s+(XX)?["\'].*["\'](XX)?', l) for l in lines)


def main():
    status = results()
    rows, notes = defaultdict(Counter), []
    for name, st in status.items():
        if not SCOPE.match(name): continue
        module = name.split('.')[0] + '.py'
        if st == 'not checked': rows[module]['not run'] += 1; continue
        if st in KILLED: rows[module]['killed'] += 1; continue
        lines = diff(name)
        why = 'docstring only' if docstring_only(lines) else EQUIVALENT.get(name)
        rows[module]['equivalent' if why else 'not explained'] += 1
        notes.append((name, st, why or 'NOT EXPLAINED: needs a test', lines))
    text = ['# Mutation testing of the recipe modules', '',
            'Made by `mutmut run` (README, Tests; the `[mutmut]` section of setup.cfg) and then '
            '`python results/mutation/report.py`; mutmut 3.8.1, `OMP_NUM_THREADS=1`, 2 CPU cores. Every mutant of the '
            'in-scope functions was run against the fast tests that call it. Score = killed / (mutants run − '
            'equivalent ones). A mutant is equivalent when it changes only a docstring, or for the reason written '
            'beside it; one marked NOT EXPLAINED still needs a test or a reason.', '',
            '| module | mutants run | killed | equivalent (survived) | survived, not explained | not run | score |',
            '|---|---|---|---|---|---|---|']
    for module, c in sorted(rows.items()):
        run = c['killed'] + c['equivalent'] + c['not explained']
        score = f"{100 * c['killed'] / (run - c['equivalent']):.1f}%" if run > c['equivalent'] else '–'
        text.append(f"| `{module}` | {run} | {c['killed']} | {c['equivalent']} | {c['not explained']} | "
                    f"{c['not run']} | {score} |")
    text += ['', 'Every in-scope mutant with its verdict: [status.txt](status.txt).', '',
             '## Every mutant that survived, and why', '']
    for name, st, why, lines in notes:
        text += [f'- `{name}` ({st}): {why}', '  ```diff', *('  ' + l for l in lines), '  ```']
    (HERE / 'README.md').write_text('\n'.join(text) + '\n')
    # Every in-scope mutant and mutmut's verdict, so a later run can be compared line by line.
    (HERE / 'status.txt').write_text(''.join(f'{n}: {st}\n' for n, st in sorted(status.items()) if SCOPE.match(n)))
    print('\n'.join(text[:8 + len(rows)]))


if __name__ == '__main__': main()
