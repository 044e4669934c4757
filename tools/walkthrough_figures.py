"""Copy the figures of the executed walkthrough notebook into results/walkthrough/, so that the README can show them."""
import base64, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported
from fastcore.script import call_parse



def tagged_pngs(nb):
    "(name, PNG bytes) of each image a cell tagged `figure:<name>` shows; a second image of one cell is <name>-2."
    for cell in nb['cells']:
        names = [t.split(':', 1)[1] for t in cell.get('metadata', {}).get('tags', []) if t.startswith('figure:')]
        pngs = [o['data']['image/png'] for o in cell.get('outputs', []) if 'image/png' in o.get('data', {})]
        for name in names:
            for k, png in enumerate(pngs): yield name + (f'-{k + 1}' if k else ''), base64.b64decode(png)


@call_parse
def main(notebook: str = str(ROOT / 'experiments' / 'walkthrough.ipynb'),  # an executed notebook
         out: str = str(ROOT / 'results' / 'walkthrough')):                 # folder for <name>.png
    "Write each figure of the notebook's cells tagged `figure:<name>` as <out>/<name>.png: the very bytes it shows."
    with user_errors('walkthrough_figures.py'):
        try: nb = json.loads(Path(notebook).read_text())
        except (OSError, ValueError) as e: raise UsageError(f'cannot read the notebook {notebook} ({e})') from None
        figures = list(tagged_pngs(nb))
        if not figures: raise UsageError(f'{notebook} shows no figure in a cell tagged figure:<name>; execute it first')
        Path(out).mkdir(parents=True, exist_ok=True)
        for name, png in figures:
            (Path(out) / f'{name}.png').write_bytes(png)
            print(f'{Path(out) / name}.png')
