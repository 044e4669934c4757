"""Break the recipe one change at a time, in a copy of this checkout, and run the test meant to catch each change.

python results/cpu-checks/recipe_breaks.py > results/cpu-checks/recipe-tests.log
python results/cpu-checks/recipe_breaks.py 32 33 … > results/cpu-checks/evaluation-tests.log  (only the breaks numbered)
Every line should say FAILED: the test caught the break. The last line runs the same tests on the unbroken copy.
"""
import os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
R, T, P = 'tests/test_recipe.py::', 'tests/test_reliability.py::', 'tests/test_predict.py::'
E = 'tests/test_evaluate.py::'
I, L = 'tests/test_imports.py::', 'tests/test_lint.py::'
S, H = 'tests/test_app_server.py::', 'tests/test_space.py::'
C = 'tests/test_cam_eval.py::'

# (what the break does, file, text, replacement, the test that should fail)
BREAKS = [
    ('no flip', 'data.py', 'PadCropFlip(pad, flip_p=0.5)', 'PadCropFlip(pad, flip_p=0.)',
     R + 'test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square'),
    ('no Cutout', 'data.py', ', Cutout(cutout)])', '])',
     R + 'test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square'),
    ('Cutout before Normalize', 'augment.py', '    order = 100\n', '    order = 50\n',
     R + 'test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square'),
    ('edge padding, not reflection', 'augment.py', 'return (n - 1) - ((n - 1) - i.abs()).abs()',
     'return i.clamp(0, n - 1)', R + 'test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square'),
    ('no crop (pad 0)', 'data.py', 'def array_block(images, labels, vocab, test_idx, pad=4,',
     'def array_block(images, labels, vocab, test_idx, pad=0,',
     R + 'test_an_unshuffled_training_batch_is_padcrop_flip_then_one_mean_square'),
    ('no Nesterov', 'train.py', 'momentum=mom, nesterov=True', 'momentum=mom, nesterov=False',
     R + 'test_the_optimizer_is_torch_sgd_with_nesterov_momentum_and_l2_decay'),
    ('no Nesterov (the step)', 'train.py', 'momentum=mom, nesterov=True', 'momentum=mom, nesterov=False',
     R + 'test_bn_weights_decay_by_the_l2_nesterov_step'),
    ('no weight decay', 'train.py', 'mom=0.9, wd=5e-4,', 'mom=0.9, wd=0.,',
     R + 'test_the_optimizer_is_torch_sgd_with_nesterov_momentum_and_l2_decay'),
    ('weight decay only from fit', 'train.py', ', nesterov=True, weight_decay=wd)', ', nesterov=True)',
     R + 'test_the_optimizer_is_torch_sgd_with_nesterov_momentum_and_l2_decay'),
    ('wd_bn_bias left to fastai (False)', 'train.py', '                         wd_bn_bias=True,\n', '',
     R + 'test_bn_weights_still_decay_with_fastais_own_sgd'),
    ('unscaled logits', 'train.py', 'wd=5e-4, logit_scale=0.125,', 'wd=5e-4, logit_scale=1.,',
     R + 'test_the_loss_and_its_activation_scale_the_logits_by_one_eighth'),
    ('unscaled activation', 'train.py', 'return F.softmax(x * self.scale, dim=-1)', 'return F.softmax(x, dim=-1)',
     R + 'test_the_loss_and_its_activation_scale_the_logits_by_one_eighth'),
    ('lowest-loss mistakes', 'interpret.py', 'argsort(descending=True)', 'argsort(descending=False)',
     R + 'test_the_misclassified_shown_are_the_highest_loss_mistakes_highest_first'),
    ('least-confused pairs', 'interpret.py', 'key=lambda p: -p[2]', 'key=lambda p: p[2]',
     R + 'test_most_confused_are_the_largest_off_diagonal_counts_largest_first'),
    ('FIT_DECADES 0.5 -> 0.3', 'lrfind.py', 'FIT_DECADES = 0.5', 'FIT_DECADES = 0.3',
     R + 'test_the_readmes_lr_table_is_what_the_rule_gives_on_the_h100_curves'),
    ('DESCENT 0.05 -> 0.04', 'lrfind.py', 'DESCENT = 0.05', 'DESCENT = 0.04',
     R + 'test_the_readmes_lr_table_is_what_the_rule_gives_on_the_h100_curves'),
    ('FinderError a usage error (exit 2)', 'lrfind.py', 'class FinderError(RunError):',
     "class FinderError(__import__('cli').UsageError):",
     T + 'test_a_finder_curve_too_short_is_a_run_failure_not_a_usage_error'),
    ('ACCELERATE_USE_CPU left set', 'processes.py',
     "        if env is None: os.environ.pop('ACCELERATE_USE_CPU', None)", '        if 0: pass',
     T + 'test_distributed_restores_the_environment'),
    ('--out not-empty check gone', 'experiments/run.py', "    if out.is_dir() and any(out.iterdir()): raise",
     '    if 0: raise', T + 'test_out_that_is_not_empty'),
    ('--out writable check gone', 'experiments/run.py', '    if not os.access(parent, os.W_OK): raise',
     '    if 0: raise', T + 'test_out_that_is_not_writable'),
    ('more processes than GPUs allowed', 'experiments/run.py', '        if rank >= gpus: raise', '        if 0: raise',
     T + 'test_more_processes_than_gpus'),
    ('--bs that does not split allowed', 'experiments/run.py', '    if s.bs % world: raise', '    if 0: raise',
     T + 'test_a_batch_that_does_not_split_over_the_processes'),
    ('logit_scale not recorded', 'experiments/run.py', "    config['logit_scale'] = learn.loss_func.scale", '    pass',
     P + 'test_a_run_records_its_logit_scale_and_predict_uses_it'),
    ('predict ignores the recorded scale', 'predict.py', "getattr(model, 'logit_scale', ScaledCrossEntropy().scale)",
     'ScaledCrossEntropy().scale', P + 'test_a_run_records_its_logit_scale_and_predict_uses_it'),
    ('old runs default to 1, not 0.125', 'run_folder.py', ".get('logit_scale', 0.125)", ".get('logit_scale', 1.)",
     P + 'test_a_run_records_its_logit_scale_and_predict_uses_it'),
    ('cams.py ignores the recorded scale', 'run_folder.py', 'cifar_learner(dls, model, logit_scale=model.logit_scale)',
     'cifar_learner(dls, model)', P + 'test_cams_explains_a_run_with_its_own_logit_scale'),
    ("cams.py's second run fails", 'cams.py',
     "    add_to_report(out / 'report.md', layer, files, grid, layers_png, note)\n",
     "    add_to_report(out / 'report.md', layer, files, grid, layers_png, note)\n    if n == 2: raise SystemExit(3)\n",
     'tests/test_cams.py::test_cams_end_to_end'),
    ('a missing archive skips under CI', 'tests/conftest.py', "if not ARCHIVE.exists(): skip_or_fail(",
     'if not ARCHIVE.exists(): pytest.skip(', 'tests/test_ci.py'),
    ('a missing assignment skips under CI', 'tests/test_arch.py', 'if not ASSIGNMENT.exists(): skip_or_fail(',
     'if not ASSIGNMENT.exists(): pytest.skip(', 'tests/test_ci.py'),
    ("no broadcast of rank 0's LRs", 'experiments/run.py', '        lr = broadcast(lr)', '        lr = lr',
     'tests/test_distributed.py'),
    ('the finder at each process\'s share of the batch', 'experiments/run.py',
     'finder = make_learner(cifar_dls(s.data, bs=s.bs,', 'finder = make_learner(cifar_dls(s.data, bs=s.bs // world,',
     'tests/test_distributed.py'),
    # The final evaluation: mirror TTA, calibration, evaluate.py, and where they are shown.
    ('ECE unweighted by the bins\' sizes', 'interpret.py',
     'return float((count * np.abs(acc - conf)).sum() / count.sum())',
     'return float(np.abs(acc - conf)[count > 0].mean())', E + 'test_ece_solved_by_hand'),
    ('ECE unweighted, against torchmetrics', 'interpret.py',
     'return float((count * np.abs(acc - conf)).sum() / count.sum())',
     'return float(np.abs(acc - conf)[count > 0].mean())', E + 'test_ece_matches_torchmetrics'),
    ('ECE on 10 bins', 'interpret.py', 'ECE_BINS = 15', 'ECE_BINS = 10', E + 'test_ece_matches_torchmetrics'),
    ('no mirror in the TTA pass', 'predict.py',
     'def before_batch(self): self.learn.xb = tuple(x.flip(-1) for x in self.xb)',
     'def before_batch(self): self.learn.xb = tuple(x for x in self.xb)',
     E + 'test_evaluate_mirror_tta_and_calibration_on_a_trained_run'),
    ('the TTA pass flipped upside down', 'predict.py',
     'def before_batch(self): self.learn.xb = tuple(x.flip(-1) for x in self.xb)',
     'def before_batch(self): self.learn.xb = tuple(x.flip(-2) for x in self.xb)',
     E + 'test_evaluate_mirror_tta_and_calibration_on_a_trained_run'),
    ("predict's TTA without the mirror", 'predict.py', 'return (model(x) + model(x.flip(-1))) / 2', 'return model(x)',
     E + 'test_predict_with_tta_is_the_mean_of_the_image_and_its_mirror'),
    ('bf16 evaluation where it is emulated', 'predict.py',
     "if precision == 'bf16' and auto_precision(device)[0] != 'bf16'",
     'if 0', E + 'test_native_precision_is_fp32_where_bf16_would_be_emulated'),
    ('evaluate.py --dry-run writes', 'experiments/evaluate.py', '    if not dry_run:', '    if True:',
     E + 'test_evaluate_command_records_the_numbers_once'),
    ('cams.py --image ignores --tta', 'cams.py', 'k=len(classes), tta=tta)', 'k=len(classes))',
     E + 'test_cams_image_with_tta_prints_the_tta_probabilities'),
    ('no reliability diagram in a run', 'experiments/run.py',
     "    plot_reliability(ev.probs, ev.targs, out / 'calibration.png')\n", '',
     'tests/test_run.py::test_run_on_a_tiny_folder_leaves_every_file'),
    ('percentages rounded, 99.96% shown as 100.0%', 'app.py', 'math.floor(round(p * 1000, 6)) / 10',
     'round(p * 1000) / 10', 'tests/test_app.py::test_percent_has_one_decimal_and_never_rounds_up_to_certainty'),
    ('the app ignores --tta', 'app.py', 'k=int(k), tta=st.tta)', 'k=int(k))',
     'tests/test_app_server.py::test_with_tta_it_answers_with_mirror_tta'),
    # The checkout is the suite: commands from any folder, quietly; the docs' imports; the linter.
    ('a command that does not quiet the warning', 'experiments/evaluate.py',
     "quiet_warnings()  # before fastai's import (below), which warns while it is imported\n", '',
     I + 'test_every_command_starts_quietly_from_any_folder'),
    ('a tool that does not put its checkout first', 'tools/half_weights.py', 'sys.path.insert(0, str(ROOT))', 'pass',
     I + 'test_every_command_starts_quietly_from_any_folder'),
    ('importing cli filters the warning again', 'cli.py', '\n\nclass UsageError(Exception):',
     '\n\nquiet_warnings()\n\n\nclass UsageError(Exception):', I + 'test_importing_cli_changes_no_warning_filter'),
    ("the docs import load_model from predict", 'docs/gradcam.md',
     'from predict import predict, preprocess\nfrom run_folder import load_model\n',
     'from predict import load_model, predict, preprocess\n', 'tests/test_readme.py::test_the_gradcam_snippet_runs'),
    ('the exported learner loaded where arch is the other package', 'tests/test_share.py',
     "    env = {**os.environ, 'PYTHONPATH': str(ROOT)}\n", "    env = {**os.environ, 'PYTHONPATH': ''}\n",
     'tests/test_share.py::test_a_run_exports_a_learner_that_predicts_as_predict_does'),
    ('ruff without pyflakes', 'pyproject.toml', 'select = ["F", "E501"]', 'select = ["E501"]',
     L + 'test_the_configuration_catches_what_it_is_for'),
    ('an unused import', 'rng.py', 'import random\n', 'import os, random\n', L + 'test_ruff_check_passes'),
    # The misclassified gallery from the run's own small file, with no data set.
    ('the app ignores mistakes.npz', 'app.py', '    interp, worst = load_mistakes(run) or (None, None)\n',
     '    interp, worst = None, None\n',
     S + 'test_without_the_data_set_it_classifies_and_shows_the_mistakes_the_run_kept'),
    ('a run keeps no mistakes.npz', 'experiments/run.py', "    save_mistakes(interp, out / 'mistakes.npz')", '    pass',
     'tests/test_run.py::test_run_on_a_tiny_folder_leaves_every_file'),
    ('the first 50 mistakes kept, not the worst', 'interpret.py',
     '    idx = top_misclassified(interp, k)\n    x = interp[idx][0]',
     '    idx = torch.nonzero(interp.decoded != interp.targs).flatten()[:k]\n    x = interp[idx][0]',
     S + 'test_the_kept_mistakes_are_the_worst_and_their_inputs'),
    ('a broken mistakes.npz is a traceback', 'run_folder.py',
     '    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:', '    except ZeroDivisionError as e:',
     S + 'test_a_broken_mistakes_file_is_one_line'),
    ('evaluate.py writes no mistakes.npz', 'experiments/evaluate.py',
     "mistakes=None if dry_run else run / 'mistakes.npz')", 'mistakes=None)',
     E + 'test_evaluate_command_records_the_numbers_once'),
    ('the Space lacks a module app.py imports', 'tools/space.py', '        modules = app_modules()\n',
     "        modules = [m for m in app_modules() if m != 'rng']\n",
     H + 'test_the_space_holds_the_app_its_modules_pins_and_run'),
    ('the Space holds a module app.py does not import', 'tools/space.py', '        modules = app_modules()\n',
     "        modules = app_modules() + ['callbacks']\n", H + 'test_the_space_holds_the_app_its_modules_pins_and_run'),
    ('the Space pins only the direct requirements', 'tools/space.py',
     '        requirements = locked(app_requirements(), versions)\n',
     '        requirements = {r.name: versions[canonicalize_name(r.name)] for r in app_requirements()}\n',
     H + 'test_the_space_holds_the_app_its_modules_pins_and_run'),
    ('the run outside the Space\'s runs/', 'tools/space.py', "dest = out / 'runs' / run.name", 'dest = out / run.name',
     H + 'test_the_space_serves_with_no_flags_and_no_data'),
    ('space.py writes into a full folder', 'tools/space.py', '(not out.is_dir() or any(out.iterdir()))',
     'not out.is_dir()', H + 'test_its_errors_are_one_line'),
    ('deletion removes the lowest-ranked pixels first', 'cam_eval.py', '(-flat.gather(1, perm)).argsort(dim=1',
     '(flat.gather(1, perm)).argsort(dim=1', C + 'test_deletion_and_insertion_rank_the_evidence_first'),
    ('deletion dims the pixels instead of removing them', 'cam_eval.py',
     'deleted = torch.where(first, torch.zeros_like(x), x[None])',
     'deleted = torch.where(first, 0.9 * x[None], x[None])',
     C + 'test_deletion_and_insertion_rank_the_evidence_first'),
    ('insertion starts from the image, not the blurred one', 'cam_eval.py',
     'inserted = torch.where(first, x[None], blurred[None])', 'inserted = torch.where(first, x[None], x[None])',
     C + 'test_deletion_and_insertion_rank_the_evidence_first'),
    ('the area under a curve from its right ends only', 'cam_eval.py',
     'return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)', 'return curve[:, 1:].mean(1)',
     C + 'test_the_curves_start_and_end_where_they_should'),
    ('ROAD with MoRF and LeRF swapped', 'cam_eval.py', 'for metric in (ROADLeastRelevantFirst, ROADMostRelevantFirst)',
     'for metric in (ROADMostRelevantFirst, ROADLeastRelevantFirst)', C + 'test_road_ranks_the_evidence_first'),
    ('randomization that re-initializes nothing', 'cam_eval.py',
     'if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)): mod.reset_parameters()',
     'if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)): pass',
     C + 'test_the_sanity_check_tells_sobel_edges_from_gradcam'),
    ('Spearman on the values, not their ranks', 'cam_eval.py',
     'torch.from_numpy(rankdata(m.flatten(1).numpy(), axis=1)).double()', 'm.flatten(1).double()',
     C + 'test_spearman'),
    ('Grad-CAM without its ReLU', 'cams.py', 'cam = F.relu((weights * a).sum(1, keepdim=True))',
     'cam = (weights * a).sum(1, keepdim=True)', C + 'test_our_gradcam_is_pytorch_grad_cams'),
]


def pytest(tree, *tests):
    "Run tests (ids or files) in `tree`: 'PASSED' or 'FAILED', and the seconds it took."
    env = {**os.environ, 'PYTHONPATH': str(tree), 'PYTHONWARNINGS': 'ignore::FutureWarning',
           # the copy has no ../shared beside it
           'CIFAR10_TGZ': str(ROOT.parent / 'shared' / 'data' / 'cifar10-png.tgz')}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests], cwd=tree,
                       env=env, capture_output=True, text=True, timeout=900)
    return ('PASSED' if r.returncode == 0 else f'FAILED (exit {r.returncode})'), time.perf_counter() - t


def main(only=None):
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / 'tree'
        files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
        for f in files:
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout
        print(f'checkout {head.strip()}, {len(BREAKS)} breaks, one at a time', flush=True)
        for i, (what, f, old, new, test) in enumerate(BREAKS, 1):
            if only and i not in only: continue
            text = (tree / f).read_text()
            assert text.count(old) == 1, f'break {i} ({what}): {old!r} is not once in {f}'
            (tree / f).write_text(text.replace(old, new))
            try: result, secs = pytest(tree, test)
            finally: (tree / f).write_text(text)
            print(f'{i:2d}. {what} ({f}): {test} -> {result} [{secs:.0f} s]', flush=True)
        tests = sorted({t for i, (*_, t) in enumerate(BREAKS, 1) if not only or i in only})
        result, secs = pytest(tree, *tests)
        print(f'unbroken: the {len(tests)} tests above -> {result} [{secs:.0f} s]', flush=True)


if __name__ == '__main__': main({int(a) for a in sys.argv[1:]} or None)
