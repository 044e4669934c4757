#!/usr/bin/env bash
# The GPU check in one command: tests/gpu, the 5-seed benchmark at fp32 (with both baselines) and at bf16 +
# channels-last, and a torch.profiler summary of one epoch. Each step has its own time limit and logs as it goes;
# after each step the whole results folder is packed again into $OUT/gpu-results.tgz, so a run cut off anywhere
# still brings back every step it finished. A second call with the same $RESULTS does only the steps not yet done.
#
#   tools/gpu_check.sh [CIFAR10_DIR]       (default: $CIFAR10_DIR, else /tmp/cifar/cifar10)
#
# The device calls that bring the data and run this: tools/GPU_CHECK.md. Settings (environment):
#   RESULTS  results folder (default results/gpu)     OUT     where the archive goes (unset: no archive)
#   STEPS    steps, in order (default "decode tests fp32 bf16 profile")     FORCE=1  redo steps already done
#   BUDGET   seconds for all steps of this call (default 570); a step starts only if its MIN_<step> is left
#   SEEDS (5), BASELINE_EPOCHS (3: stock fastai and the plain loop run 3 epochs, extrapolated to all)
#   T_<step>, MIN_<step>   a step's own time limit, and the least time left worth starting it with
#   TEST_WORKERS (3)   pytest-xdist processes for tests/gpu, where it is installed
#   FAST     the faster setting (default "--precision bf16 --channels-last")
#   BENCH_FLAGS, PROFILE_FLAGS   extra flags for bench.py / profile_epoch.py      PYTHON (default python3)
#   REHEARSE=1   a tiny CPU setting of all the above, to check the script end to end without a GPU
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DATA=${1:-${CIFAR10_DIR:-/tmp/cifar/cifar10}}
if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
  echo "gpu_check.sh: error: $DATA has no train/ and test/ (give the unpacked CIFAR-10 folder or set CIFAR10_DIR)" >&2
  exit 2
fi
if [ "${REHEARSE:-0}" = 1 ]; then  # 200 images, 1 epoch, 2 seeds, on the CPU: minutes, not hours
  : "${SEEDS:=2}" "${BASELINE_EPOCHS:=1}" "${BUDGET:=3000}" "${BF16_BASELINES:=--baseline-epochs 1}"
  : "${BENCH_FLAGS:=--subset 200 --epochs 1 --bs 20 --find-iters 20 --device cpu}"
  : "${PROFILE_FLAGS:=--subset 200 --bs 20 --device cpu}"
  : "${T_DECODE:=300}" "${T_TESTS:=300}" "${T_FP32:=1200}" "${T_BF16:=1200}" "${T_PROFILE:=300}"
  : "${RESULTS:=results/gpu-rehearsal}"
fi
RESULTS=${RESULTS:-results/gpu}
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-decode tests fp32 bf16 profile}
SEEDS=${SEEDS:-5}
BASELINE_EPOCHS=${BASELINE_EPOCHS:-3}
FAST=${FAST:---precision bf16 --channels-last}
BENCH_FLAGS=${BENCH_FLAGS:-}
PROFILE_FLAGS=${PROFILE_FLAGS:-}
BUDGET=${BUDGET:-570}
# Each step's own limit (a stuck step cannot eat the others' time) and the least time worth starting it with.
T_DECODE=${T_DECODE:-60};   MIN_DECODE=${MIN_DECODE:-10}
T_TESTS=${T_TESTS:-180};    MIN_TESTS=${MIN_TESTS:-45}
T_FP32=${T_FP32:-400};      MIN_FP32=${MIN_FP32:-270}
T_BF16=${T_BF16:-300};      MIN_BF16=${MIN_BF16:-180}
T_PROFILE=${T_PROFILE:-90}; MIN_PROFILE=${MIN_PROFILE:-20}
# bench.py has no switch to skip its baselines yet: the bf16 run takes them for 1 epoch, the least it allows.
if [ -z "${BF16_BASELINES:-}" ]; then
  if grep -q 'no_baselines' experiments/bench.py; then BF16_BASELINES=--no-baselines
  else BF16_BASELINES='--baseline-epochs 1'; fi
fi
export CIFAR10_DIR=$DATA PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$RESULTS"
R=$(cd "$RESULTS" && pwd)
LOG=$R/gpu_check.log

log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

pack() {  # the whole results folder, without weights, as one archive (at most 8 files come back from a device)
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  local a=$OUT/gpu-results.tgz
  tar -czf "$a.tmp" --exclude='*.pth' --exclude='*.tmp' --exclude=subset-data -C "$R" . \
    && mv "$a.tmp" "$a"  # renamed only when whole: a kill mid-pack leaves the previous archive
  if [ -f "$a" ] && [ "$(stat -c %s "$a")" -gt 15000000 ]; then  # a file over 16 MiB would not come back
    tar -czf "$a.tmp" --exclude='*.pth' --exclude='*.tmp' --exclude=subset-data --exclude='*/runs/*/*.png' -C "$R" . && mv "$a.tmp" "$a"
  fi
  cp "$LOG" "$OUT/gpu_check.log" 2>/dev/null
  return 0
}

done_before() { [ "${FORCE:-0}" != 1 ] && [ -f "$R/steps.tsv" ] && awk -v s="$1" '$1 == s && $2 == 0 {f = 1} END {exit !f}' "$R/steps.tsv"; }

# Run step $1 (function step_$1) under its limit, from what is left of the budget; record its status and pack.
run_step() {
  local name=$1 cap min left limit rc start
  cap=$(eval echo "\$T_${name^^}"); min=$(eval echo "\$MIN_${name^^}")
  if done_before "$name"; then log "$name: done in an earlier call, skipped (FORCE=1 redoes it)"; return; fi
  left=$((BUDGET - SECONDS)); limit=$((cap < left ? cap : left))
  if [ "$limit" -lt "$min" ]; then
    log "$name: NOT RUN, ${left}s of the budget left and it needs at least ${min}s; call the script again for it"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$R/steps.tsv"; pack; return
  fi
  log "$name: start, limit ${limit}s"
  start=$SECONDS
  TIMEOUT="timeout -k 15 $limit" "step_$name"; rc=$?
  case $rc in
    0) log "$name: ok in $((SECONDS - start))s" ;;
    124|137) log "$name: CUT OFF at its ${limit}s limit (exit $rc) after $((SECONDS - start))s" ;;
    *) log "$name: FAILED, exit $rc, after $((SECONDS - start))s" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$R/steps.tsv"
  pack
}

# The first-time decode of the PNGs into the cache, timed on its own so that no later step pays for it.
step_decode() {
  $TIMEOUT "$PYTHON" -c "import sys, time; from data import load_arrays; t = time.perf_counter(); \
c, a = load_arrays(sys.argv[1]); print(f'{len(a[\"train\"][0]):,} + {len(a[\"test\"][0]):,} images in {time.perf_counter() - t:.1f} s')" \
    "$DATA" > "$R/decode.log" 2>&1
  local rc=$?; tee -a "$LOG" < "$R/decode.log"; return $rc
}

# In TEST_WORKERS processes where pytest-xdist is installed (the GPU image has it): these tests check that the
# commands work on CUDA, not how fast, and run mostly start-up and CPU work that 16 cores can overlap.
step_tests() {
  local par=()
  if [ "${TEST_WORKERS:-3}" -gt 1 ] && "$PYTHON" -c 'import xdist' 2> /dev/null; then par=(-n "${TEST_WORKERS:-3}"); fi
  echo "pytest tests/gpu ${par[*]:-(one process: no pytest-xdist here)}" | tee -a "$LOG"
  $TIMEOUT "$PYTHON" -m pytest tests/gpu "${par[@]}" -v -rA --durations=0 -p no:cacheprovider > "$R/tests-gpu.log" 2>&1
  local rc=$?; tail -n 3 "$R/tests-gpu.log" | tee -a "$LOG"; return $rc
}

# A bench.py run into $R/$1 (cleared first: run.py never writes into a used run folder); flags follow.
bench() {
  local dir=$R/$1; shift
  rm -rf "$dir"; mkdir -p "$dir"
  # shellcheck disable=SC2086  # the flag strings are split on purpose
  echo "$PYTHON experiments/bench.py --data $DATA --seeds $SEEDS --out $dir $* $BENCH_FLAGS" > "$dir/bench.log"
  $TIMEOUT "$PYTHON" experiments/bench.py --data "$DATA" --seeds "$SEEDS" --out "$dir" "$@" $BENCH_FLAGS \
    >> "$dir/bench.log" 2>&1
  local rc=$?
  tee -a "$LOG" < "$dir/bench.log"
  [ -f "$dir/summary.json" ] || partial_summary "$dir"
  return $rc
}

# Cut off before its summary: summarise the seeds that finished, with bench.py's own code (no baselines).
partial_summary() {
  "$PYTHON" - "$1" 2>&1 <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
sys.path.insert(0, 'experiments')
from bench import render, summarize
from report import read_csv
out, runs = Path(sys.argv[1]), []
for f in sorted(out.glob('runs/seed*/config.json'), key=lambda f: int(f.parent.name[4:])):
    c = json.loads(f.read_text())
    if 'train' not in c['seconds']: continue  # stopped before its fit ended
    runs.append((c, read_csv(f.parent / 'metrics.csv')[-1], json.loads((f.parent / 'lr_find.json').read_text())))
if not runs: sys.exit(f'{out}: no seed finished, no partial summary')
c = runs[0][0]
s = summarize(c['device_name'], runs, {}, c['epochs'])
s.update(partial=True, subset=c['subset'], precision=c['precision'], channels_last=c['channels_last'])
(out / 'partial-summary.json').write_text(json.dumps(s, indent=2) + '\n')
print(f'{out}: PARTIAL, {len(runs)} seed(s) finished, no baselines\n{render(s)}')
EOF
}

step_fp32() {
  log "fp32: stock fastai and the plain loop run $BASELINE_EPOCHS epoch(s) only; their times for all the epochs are" \
      "EXTRAPOLATED from those (bench.py --baseline-epochs)"
  bench fp32 --baseline-epochs "$BASELINE_EPOCHS"
}

step_bf16() {
  # shellcheck disable=SC2086
  bench bf16-channels-last $FAST $BF16_BASELINES
}

step_profile() {
  mkdir -p "$R/profile"
  # shellcheck disable=SC2086
  $TIMEOUT "$PYTHON" experiments/profile_epoch.py --data "$DATA" $FAST --out "$R/profile" $PROFILE_FLAGS \
    > "$R/profile/profile.log" 2>&1
  local rc=$?
  if [ "$rc" = 0 ]; then sed -n '3,/^$/p' "$R/profile/profile.txt" | tee -a "$LOG"; else tail -n 5 "$R/profile/profile.log" | tee -a "$LOG"; fi
  return $rc
}

log "gpu_check.sh in $ROOT: data $DATA, results $R, steps: $STEPS; budget ${BUDGET}s; seeds $SEEDS; FAST: $FAST;" \
    "bf16 baselines: $BF16_BASELINES; BENCH_FLAGS: ${BENCH_FLAGS:-none}; PROFILE_FLAGS: ${PROFILE_FLAGS:-none}"
{ if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  else echo 'nvidia-smi: not here'; fi
  echo "CPU cores: $(nproc)"; git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'git: no commit here'
  "$PYTHON" -c "import sys, torch, fastai; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'fastai', fastai.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} > "$R/env.txt"
tee -a "$LOG" < "$R/env.txt"
pack
for s in $STEPS; do
  if ! declare -F "step_$s" > /dev/null; then log "$s: no such step (steps: decode tests fp32 bf16 profile)"; continue; fi
  run_step "$s"
done
status() { awk -v s="$1" '$1 == s {st = $2} END {print st}' "$R/steps.tsv"; }  # a step's latest status
summary=; bad=0
for s in $STEPS; do st=$(status "$s"); summary+="$s=${st:-none} "; [ "$st" = 0 ] || bad=1; done
log "end: ${summary}(0 = ok, 124/137 = cut off, skipped = no time left: call again)"
pack
exit $bad
