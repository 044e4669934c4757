#!/usr/bin/env bash
# Ship a finished run into results/NAME: every file but checkpoint.pth and export.pkl (the same weights again), its
# console log, model.pth in fp16 once tools/half_weights.py shows what that costs, the Grad-CAM of its mistakes
# and the app's screenshots of it.
# Usage, from the project's root: tools/ship_run.sh RUN_FOLDER RUN_LOG NAME
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 RUN_FOLDER RUN_LOG NAME" >&2; exit 2; }
run=$1 log=$2 dest=results/$3
[ -f "$run/model.pth" ] || { echo "$0: $run has no model.pth: the run has not finished" >&2; exit 2; }
[ ! -e "$dest" ] || { echo "$0: $dest exists already" >&2; exit 2; }
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
cp -r "$run"/. "$dest"/
rm -f "$dest/checkpoint.pth" "$dest/export.pkl"
cp "$log" "$dest/run.log"
"$py" tools/half_weights.py "$dest" --write | tee "$dest/half-weights.log"
"$py" cams.py --n 10 --run "$dest" | tee "$dest/cams.log"
"$py" tools/app_screenshot.py --run "$dest" --out results/app | tee results/app/screenshot.log
du -sh "$dest"
