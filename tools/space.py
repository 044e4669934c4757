"""A run as a Hugging Face Space folder: app.py, the modules it imports, pinned requirements, the run itself."""
import ast, shutil, sys
from configparser import ConfigParser
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import RunError, UsageError, quiet_warnings, user_errors  # noqa: E402
quiet_warnings()  # before fastai's import (run_folder, below), which warns while it is imported
from fastcore.script import call_parse  # noqa: E402
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

# What app.py reads from a run folder (app.load): nothing else of the run goes into the Space.
RUN_FILES = ('config.json', 'metrics.csv', 'model.pth', 'mistakes.npz')
# The Hub refuses binary files in plain git: they go through its large-file storage.
LFS = ('*.pth', '*.npz', '*.png')


def local_imports(file):
    "The checkout's top-level modules that `file` imports anywhere, inside functions included."
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import): names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0: names.add(node.module.split('.')[0])
    return {n for n in names if (ROOT / f'{n}.py').is_file()}


def app_modules(entry='app'):
    "Every module of the checkout that `entry` imports, directly or through another, `entry` included."
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name not in seen: seen.add(name); todo += local_imports(ROOT / f'{name}.py')
    return sorted(seen)


def pins(file=ROOT / 'constraints.txt'):
    "constraints.txt as {canonical name: version}."
    lines = (line.split('#')[0].strip() for line in file.read_text().splitlines())
    return {canonicalize_name(name): version for name, version in (line.split('==') for line in lines if line)}


def app_requirements():
    "setup.cfg's install_requires and its [app] extra: the app's direct requirements."
    cfg = ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    lines = (cfg['options']['install_requires'] + '\n' + cfg['options.extras_require']['app']).splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith('#')]


def locked(requirements, versions):
    "Every package `requirements` need on this platform, at its constraints.txt version: {name: version}."
    # Walked through the installed packages' own metadata, so this venv must be the one constraints.txt made.
    env, out, seen, todo = default_environment(), {}, set(), [(r, '') for r in requirements]
    while todo:
        req, extra = todo.pop()  # `extra`: the one its dependant was asked for with ('' for none)
        if req.marker and not req.marker.evaluate({**env, 'extra': extra}): continue
        name = canonicalize_name(req.name)
        if name not in versions: raise RunError(f'{req.name} (needed by the app) is not pinned in constraints.txt')
        try: installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            raise UsageError(f'{req.name} is not installed here; install the app first: '
                             "pip install -c constraints.txt -e '.[app]'") from None
        if installed.split('+')[0] != versions[name]:  # torch's local label: 2.14.1+cu130
            raise UsageError(f'{req.name} {installed} is installed, constraints.txt pins {versions[name]}; '
                             "reinstall with: pip install -c constraints.txt -e '.[app]'")
        if not req.specifier.contains(versions[name], prereleases=True):
            raise RunError(f'constraints.txt pins {req.name}=={versions[name]}, outside the app\'s {req}')
        out[name] = versions[name]
        for e in ('', *req.extras):
            if (name, e) not in seen:
                seen.add((name, e))
                todo += [(Requirement(r), e) for r in metadata.requires(req.name) or []]
    return dict(sorted(out.items()))


def front_matter(run, sdk_version):
    "The Space's README.md: the front matter the Hub reads, then what the Space is."
    from report import headline
    python = '.'.join(map(str, sys.version_info[:2]))
    return f"""---
title: ResNet-9 on CIFAR-10
sdk: gradio
sdk_version: {sdk_version}
python_version: "{python}"
app_file: app.py
pinned: false
license: apache-2.0
---

# The custom ResNet ("ResNet-9") on CIFAR-10

The run `{run.name}`: {headline(run)}.

Upload images for their top classes and Grad-CAM at any block, or see the test set's highest-loss mistakes.
The same app serves locally with `python app.py`; its API has two endpoints, `/classify` and `/mistakes`.
Made by `tools/space.py` from a checkout of the ResNet-9 experiment suite.
"""


@call_parse
def main(run: str = None,  # run folder (default: the newest finished one under runs/)
         out: str = None):  # the Space folder to write: a new or empty one
    "Write a folder that a Hugging Face Space (Gradio SDK) serves as it is: the app, its modules, its pins, the run."
    with user_errors('space.py'):
        if out is None: raise UsageError('--out DIR is required: the Space folder to write')
        from run_folder import find_run
        run, out = find_run(run), Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f'--out {out} exists and is not an empty folder; choose a new one')
        if not (run / 'mistakes.npz').exists():
            raise UsageError(f'{run} has no mistakes.npz, and a Space has no test set for the misclassified gallery; '
                             f'write it first: python experiments/evaluate.py --run {run}')
        if not (run / 'metrics.csv').exists():
            raise UsageError(f'run folder {run} has no metrics.csv; did its training finish?')
        versions = pins()
        requirements = locked(app_requirements(), versions)
        modules = app_modules()
        dest = out / 'runs' / run.name  # app.py serves the newest run under its own runs/ when given no --run
        (dest / 'examples').mkdir(parents=True)
        for name in modules: shutil.copy2(ROOT / f'{name}.py', out / f'{name}.py')
        for f in RUN_FILES: shutil.copy2(run / f, dest / f)
        for f in sorted((run / 'examples').glob('*.png')): shutil.copy2(f, dest / 'examples' / f.name)
        (out / 'requirements.txt').write_text(
            '# Written by tools/space.py: setup.cfg\'s install_requires and [app] extra with all they need on Linux, '
            'at\n# constraints.txt\'s versions, the ones the tests used.\n'
            + ''.join(f'{name}=={version}\n' for name, version in requirements.items()))
        (out / 'README.md').write_text(front_matter(run, versions['gradio']))
        (out / '.gitattributes').write_text(''.join(f'{p} filter=lfs diff=lfs merge=lfs -text\n' for p in LFS))
        size = sum(f.stat().st_size for f in out.rglob('*') if f.is_file())
        print(f'space.py: wrote {out}: app.py and {len(modules) - 1} modules ({", ".join(modules)}), '
              f'{len(requirements)} pinned requirements, run {run.name} ({size / 1e6:.1f} MB in all)')
        print(f'space.py: try it here: cd {out} && python app.py; or push the folder to a Space with the Gradio SDK '
              '(git lfs for model.pth, mistakes.npz and the examples)')
