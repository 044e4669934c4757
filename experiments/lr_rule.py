"""Apply the LRMIN/LRMAX rule to recorded finder curves (the five real H100 curves by default): a table and figures."""
import json, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
from fastcore.script import call_parse

from lrfind import from_curve
from report import plot_lr_find


def curves_of(path):
    "(label, lrs, losses, num_it) for each curve in a curves file, an lr_find.json or a finder.py result."
    try: d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e: raise UsageError(f'cannot read finder curves from {path} ({e})') from None
    runs = d['runs'] if 'runs' in d else [d]
    label = lambda r: f"seed {r['seed']}" if 'seed' in r else Path(path).stem  # a run's lr_find.json has no seed
    out = [(label(r), r['lrs'], r['losses'], r.get('num_it', d.get('num_it', 100))) for r in runs if r.get('lrs')]
    if not out: raise UsageError(f'{path} holds no finder curve (no "lrs" and "losses"); it predates the saved curves')
    return d.get('device', ''), out


@call_parse
def main(curves: str = str(ROOT / 'tests' / 'data' / 'lr_find-curves-h100.json'),  # a curves file or lr_find.json
         out: str = 'results/lr_rule-h100'):  # folder for rule.json, README.md and lr_find-<seed>.png
    "LRMIN and LRMAX by the rule, beside fastai's four suggestions, for every curve in a file."
    with user_errors('lr_rule.py'):
        device, runs = curves_of(curves)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows, lines = [], ['| curve | minimum | steep | valley | slide | **LRMIN** | **LRMAX** | LRMAX/LRMIN | rule |',
                           '|---|---|---|---|---|---|---|---|---|']
        for label, lrs, losses, num_it in runs:
            t = time.perf_counter()
            found = from_curve(lrs, losses, num_it)
            secs = time.perf_counter() - t
            s = found.suggestions
            rows.append(dict(curve=label, lr_min=found.lr_min, lr_max=found.lr_max, rule=found.rule,
                             suggestions=s, rule_seconds=secs))
            lines.append(f"| {label} | {s['minimum']:.3g} | {s['steep']:.3g} | {s['valley']:.3g} | {s['slide']:.3g} | "
                         f"**{found.lr_min:.3g}** | **{found.lr_max:.3g}** | {found.lr_max / found.lr_min:.0f} | "
                         f"{found.rule} |")
            plot_lr_find(found, out / f"lr_find-{label.replace(' ', '')}.png",
                         title=f'lr_find on {device or curves}, {label}')
        (out / 'rule.json').write_text(json.dumps(dict(curves=str(curves), device=device, runs=rows), indent=2) + '\n')
        table = '\n'.join(lines)
        (out / 'README.md').write_text(f'# The LR rule on {device or curves}\n\n`python experiments/lr_rule.py '
                                       f'{" ".join(sys.argv[1:])}`\n\n{table}\n')
        print(table)
        print(f'the rule took at most {1e3 * max(r["rule_seconds"] for r in rows):.1f} ms a curve '
              '(fastai\'s four included)')
