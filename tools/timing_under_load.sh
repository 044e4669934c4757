#!/usr/bin/env bash
# Runs every test that asserts a measured speed N times (default 10) while two other processes keep both CPU cores
# busy, and logs each run's numbers: the evidence behind the guards in those tests.
# Usage: CIFAR10_DIR=<unpacked cifar10> tools/timing_under_load.sh [N] > results/cpu-checks/loader-speed-under-load.log
set -u
cd "$(dirname "$0")/.."
n=${1:-10}
py=${PYTHON:-.venv/bin/python}
busy() { "$py" -c 'while True: pass' & }
busy; b1=$!; busy; b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT
echo "# $(date -u +%FT%TZ) $(nproc) cores; two busy-loop processes running (pids $b1 $b2); load: $(cut -d' ' -f1-3 /proc/loadavg)"
pass=0
for i in $(seq 1 "$n"); do
  out=$("$py" -m pytest -q -s -p no:cacheprovider tests/test_loader_speed.py 2>&1)
  line=$(grep -o "{'ours_images_per_second.*}" <<<"$out")
  if grep -q ' passed' <<<"$out"; then pass=$((pass + 1)); r=pass; else r=FAIL; fi
  echo "run $i: $r $line (load $(cut -d' ' -f1 /proc/loadavg))"
done
echo "$pass of $n passed"
