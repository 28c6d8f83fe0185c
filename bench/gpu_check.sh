#!/usr/bin/env bash
# The one GPU check: bash bench/gpu_check.sh OUTDIR [--dry-run] [--with-train | --train | --tests-only | --targets]
#                    [--sweep] [--pack]
#
# On an H100/H200 with a stock CUDA image (torch, triton, timm, pytest, pytest-benchmark; no network) it
# installs nothing and reads nothing outside the repository. In <= 8 minutes in all it:
#   1. makes flashvit importable without pip: a temporary mirror of the repository whose flashvit/ folder
#      links kernels/, vit/ and bench/ in as flashvit.kernels, flashvit.vit and flashvit.bench;
#   2. runs the gpu-marked tests on CUDA, then the rest of the suite as time allows -> OUTDIR/gpu_tests.log
#      and meanwhile every benchmark row that compiles runs once in the background (fills the compile caches)
#   3. runs the op benchmarks at the kernel issues' shapes                    -> OUTDIR/ops.{json,csv,png}
#      then, in a process of their own, the kernel paths not yet run on a GPU  -> OUTDIR/ops-experimental.*
#      then (--sweep) each tile config of our two GEMM kernels alone vs torch.matmul -> OUTDIR/gemm-configs.*
#      then LayerNorm's rows timed as device time only (CUDA graph replay)     -> OUTDIR/ops-graph.*
#   4. measures host (CPU) time per op call and per train step                -> OUTDIR/overhead.{json,csv,png}
#      and profiles it (cProfile per op, one launch's cost, kernel tables)      -> OUTDIR/profile/
#   5. runs the model benchmarks (ViT-B first, then S and L as time allows)   -> OUTDIR/model.{json,csv,png}
#      each row's steps then profiled (GPU busy share, idle gaps, blocking calls) -> OUTDIR/profile/steps_*.txt
#   6. judges the issues' speed targets from those files (met / not met / not measured) -> OUTDIR/targets.txt
#      and prints a short summary last                                        -> OUTDIR/summary.txt
#
# --train: instead of all that, the main job on the GPU: `python train.py` with its defaults (the gpu
# profile) on Fashion-MNIST IDX files from GPU_TRAIN_DATA (default /usr/share/datasets/fashion-mnist; a
# GPU machine without the Debian package needs the four .gz files carried in), under one timeout
# (GPU_CHECK_SECONDS, default 330) -> OUTDIR/train.log (with date, commit and device), and the run's
# config.json, log.json and PNGs (not its checkpoints).
# --with-train: all of the above, and that training run too, in the background while the tests run (tests
# are correctness, not timings); the benchmarks wait for it to end (GPU_CHECK_TRAIN_MAX, default 270 s)
# -> OUTDIR/train/. Total budget 570 s instead of 470, and the tests get the training's time (200 s).
# --tests-only: the GPU tests alone, all of the budget (default 300 s), no warm-up beside them and no benchmarks:
# a follow-up call where the full check's tests ran out of time (run 5: 6 of 109 gpu-marked tests in 47 s).
# --targets: no tests; only the rows the issues' speed targets read (python -m flashvit.bench targets), each
# compiling row first run once in 4 processes (Triton's and Inductor's caches), then attention and MLP/GEMM rows
# (ops.json), LayerNorm's as device time (ops-graph.json), ViT-B/16 timm vs patched (model.json; the patched
# step from a CUDA graph, with attention's split loops, with its blocks' bias grads fused and with its blocks per
# layer too, each row's steps profiled; GPU_CHECK_MODEL_IMPLS: other rows), then targets.txt.
# GPU_CHECK_TARGETS picks parts (default "attention mlp layernorm model"; a session with little device time can
# split them over two calls). Default budget 540 s.
# --sweep: the GEMM config sweep too (settled by run 4; its 40 s come out of the tests').
# --pack: at the end (also when stopped early), every file under OUTDIR goes into OUTDIR/gpu_check.tar.gz
# and only that and summary.txt stay beside it (the device tool brings back at most 8 files: run 4 lost
# the rest). `tar xzf` gives the files back unchanged.
# Every step runs under `timeout`; each step's budget is what is left of the total, so one hang cannot eat
# the others' time, and whatever did not fit is listed as skipped.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): the same script on CPU with tiny shapes, short budgets and one small
# test file, for CI. Environment: PYTHON (default python3), GPU_CHECK_SECONDS (total, default 470),
# FLASHVIT_GIT_COMMIT (recorded when the checkout has no .git), GPU_CHECK_TEST_MAX / GPU_CHECK_OPS_MAX /
# GPU_CHECK_MODEL_MAX / GPU_CHECK_EXP_MAX / GPU_CHECK_SWEEP_MAX / GPU_CHECK_GRAPH_MAX / GPU_CHECK_EVERY_TEST_MAX /
# GPU_CHECK_PROFILE_MAX (step caps in seconds: 150 (200 with --with-train) / 65 / 100 / 40 / 40 / 50 / 60 / 20;
# EVERY: the share of the tests that run every autotune config alone),
# GPU_CHECK_MODELS (default "b s l"), GPU_CHECK_TESTS (test paths, default "tests bench"), GPU_CHECK_XDIST
# (pytest-xdist workers, default 6), GPU_CHECK_OPS (op families, default all), GPU_CHECK_PREWARM (processes
# for the compile warm-up, default 4), GPU_CHECK_PRETEST (a test run alone first with a full traceback),
# GPU_CHECK_PROFILE_STEPS (steps profiled after each model row, default 3; 0: none).
set -uo pipefail

DRY=${GPU_CHECK_DRY_RUN:-0}
PROFILE_STEPS=${GPU_CHECK_PROFILE_STEPS:-3}
TRAIN=0  # 1: --train (training only), 2: --with-train (training beside the tests, then the rest)
PACK=0
SWEEP=0
TESTS_ONLY=0
TARGETS=0
OUTDIR=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --train) TRAIN=1 ;;
    --with-train) TRAIN=2 ;;
    --tests-only) TESTS_ONLY=1 ;;
    --targets) TARGETS=1 ;;
    --pack) PACK=1 ;;
    --sweep) SWEEP=1 ;;
    -h|--help) sed -n '2,46p' "$0"; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) OUTDIR=$a ;;
  esac
done
[ -n "$OUTDIR" ] || { echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run] [--with-train | --train | --tests-only |" \
                           "--targets] [--sweep] [--pack]" >&2
                      exit 2; }
[ $(( (TRAIN > 0) + TESTS_ONLY + TARGETS )) -le 1 ] || { echo "--train, --with-train, --tests-only and --targets" \
                                                              "exclude each other" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PY=${PYTHON:-$(command -v python3 || command -v python)}
if [ "$TRAIN" = 1 ]; then HARD=${GPU_CHECK_SECONDS:-330}
elif [ "$TESTS_ONLY" = 1 ]; then HARD=${GPU_CHECK_SECONDS:-$(( DRY == 1 ? 150 : 300 ))}
elif [ "$TARGETS" = 1 ]; then HARD=${GPU_CHECK_SECONDS:-$(( DRY == 1 ? 200 : 540 ))}
elif [ "$DRY" = 1 ]; then HARD=${GPU_CHECK_SECONDS:-$(( TRAIN == 2 ? 300 : 240 ))}
else HARD=${GPU_CHECK_SECONDS:-$(( TRAIN == 2 ? 570 : 470 ))}; fi
T0=$SECONDS
NOTES=()
left() { echo $(( HARD - (SECONDS - T0) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
say() { echo "[gpu_check $(( SECONDS - T0 ))s] $*"; }
note() { NOTES+=("$*"); say "$*"; }

mkdir -p "$OUTDIR" || exit 2
OUT=$(cd "$OUTDIR" && pwd -P)

# ---- 1. flashvit importable without pip -------------------------------------------------------------
SHIM=$(mktemp -d "${TMPDIR:-/tmp}/flashvit-gpu-check.XXXXXX") || exit 2
pack() {  # --pack: OUT/* -> OUT/gpu_check.tar.gz (+ summary.txt left beside it)
  [ "$PACK" = 1 ] || return 0
  local files
  files=$(cd "$OUT" && find . -type f ! -name gpu_check.tar.gz ! -name '.*' | sed 's|^\./||' | sort)
  [ -n "$files" ] || return 0
  # shellcheck disable=SC2086
  if (cd "$OUT" && tar czf gpu_check.tar.gz.tmp $files && mv gpu_check.tar.gz.tmp gpu_check.tar.gz); then
    for f in $files; do [ "$f" = summary.txt ] || rm -f "$OUT/$f"; done
    find "$OUT" -mindepth 1 -type d -empty -delete
    echo "[gpu_check] packed $(echo "$files" | wc -l) files into $OUT/gpu_check.tar.gz"
  fi
}
# Background work (warm-up, training) carries this tag in its environment, and so do the processes it spawns
# (multiprocessing workers outlive a parent that `timeout` killed): none may run beside a timing.
BG_TAG="gpu-check-$$"
kill_background() {
  local p
  for p in /proc/[0-9]*; do
    # (2>/dev/null on the group: a process that ended, or is not ours to read, makes the redirect itself fail)
    { [ "${p#/proc/}" != "$$" ] && tr '\0' '\n' < "$p/environ" | grep -qx "FLASHVIT_GPU_CHECK_BG=$BG_TAG" &&
      kill -9 "${p#/proc/}"; } 2>/dev/null
  done
  return 0
}
trap 'kill_background; pack; rm -rf "$SHIM"' EXIT
for e in "$REPO"/* "$REPO"/.[!.]*; do
  [ -e "$e" ] || continue
  case "$(basename "$e")" in flashvit|.venv|.git|__pycache__|.pytest_cache) continue ;; esac
  ln -s "$e" "$SHIM/$(basename "$e")"  # a mirror of the repo root: relative paths in tests still work
done
mkdir "$SHIM/flashvit"
for e in "$REPO"/flashvit/*; do
  [ "$(basename "$e")" = __pycache__ ] || ln -s "$e" "$SHIM/flashvit/$(basename "$e")"
done
ln -s "$REPO/kernels" "$SHIM/flashvit/kernels"
ln -s "$REPO/vit" "$SHIM/flashvit/vit"
ln -s "$REPO/bench" "$SHIM/flashvit/bench"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # Python >= 3.11: no cwd on sys.path, so the repo's own flashvit/ cannot shadow the shim
export PYTHONUNBUFFERED=1
export FLASHVIT_IN_GPU_CHECK=1  # tests/test_bench_cli.py skips its own dry run of this script in here
if [ -z "${FLASHVIT_GIT_COMMIT:-}" ]; then
  FLASHVIT_GIT_COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
  export FLASHVIT_GIT_COMMIT
fi
cd "$SHIM" || exit 2

say "repo $REPO -> shim $SHIM; python $PY; dry-run=$DRY; total budget ${HARD}s"
if ! timeout -k 5 90 "$PY" - "$REPO" "$SHIM" "$DRY" <<'EOF'
import os, sys
repo, shim, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
import torch
import flashvit
import flashvit.bench
import flashvit.kernels.layernorm as ln
real = os.path.realpath(ln.__file__)
assert ln.__file__.startswith(shim + os.sep), f"flashvit.kernels.layernorm imported from {ln.__file__}, not the shim"
assert real.startswith(repo + os.sep), f"flashvit.kernels.layernorm resolves to {real}, outside {repo}"
try:
    import triton
    tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
cuda = torch.cuda.is_available()
print(f"flashvit {flashvit.__version__} from {os.path.dirname(real)}; torch {torch.__version__}, triton {tv}, "
      f"CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name() if cuda else 'cpu'}")
if not cuda and not dry:
    sys.exit("no CUDA device: run with --dry-run on a CPU machine")
EOF
then
  say "setup failed: flashvit is not importable from the shim, or no GPU (see above)"
  exit 3
fi

# ---- training: the main job (--train: only this; --with-train: in the background beside the tests) ------
TRAIN_PID=""
TRAIN_OUT=""
start_train() {  # start_train OUTDIR TIMEOUT: train.py in the background -> OUTDIR/train.log
  TRAIN_OUT=$1
  local t=$2 args
  mkdir -p "$TRAIN_OUT"
  if [ "$DRY" = 1 ]; then  # CI: the same plumbing on a few synthetic steps
    args=(--dataset synthetic --synthetic-train 64 --synthetic-test 32 --max-steps 3 --batch-size 16 --device cpu)
  else
    local data=${GPU_TRAIN_DATA:-/usr/share/datasets/fashion-mnist}
    if ! ls "$data"/train-images-idx3-ubyte* >/dev/null 2>&1; then
      note "train: no Fashion-MNIST IDX files in $data: set GPU_TRAIN_DATA to a folder holding the four files"
      return 3
    fi
    args=(--data-dir "$data")
  fi
  { echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "commit: $FLASHVIT_GIT_COMMIT"
    "$PY" -c "import torch, triton; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__, '| triton', triton.__version__)"
    echo "command: python train.py ${args[*]} --run-dir RUN --no-progress"; } > "$TRAIN_OUT/train.log" 2>&1
  say "train: python train.py ${args[*]} (timeout ${t}s) -> $TRAIN_OUT/train.log"
  FLASHVIT_GPU_CHECK_BG=$BG_TAG timeout -k 10 "$t" "$PY" "$SHIM/train.py" "${args[@]}" --run-dir "$SHIM/.train-run" --no-progress \
    >> "$TRAIN_OUT/train.log" 2>&1 &
  TRAIN_PID=$!
}
finish_train() {  # wait for the training run; copy its config, logs and plots (not its checkpoints)
  [ -n "$TRAIN_PID" ] || return 3
  wait "$TRAIN_PID"
  local rc=$?
  TRAIN_PID=""
  for f in "$SHIM"/.train-run/*.json "$SHIM"/.train-run/*.png; do [ -e "$f" ] && cp "$f" "$TRAIN_OUT/"; done
  tail -n 4 "$TRAIN_OUT/train.log"
  say "train: rc=$rc$( [ "$rc" -ge 124 ] && echo ' (timeout)'); files: $(cd "$TRAIN_OUT" && ls | tr '\n' ' ')"
  [ "$rc" -eq 0 ] || note "train: exit code $rc$( [ "$rc" -ge 124 ] && echo ' (timeout)') (see train.log)"
  return "$rc"
}
if [ "$TRAIN" = 1 ]; then
  start_train "$OUT" "$HARD" || exit 3
  finish_train
  exit $?
fi
TRAIN_RC=0
if [ "$TRAIN" = 2 ]; then
  start_train "$OUT/train" "${GPU_CHECK_TRAIN_MAX:-270}" || TRAIN_RC=3
fi

# ---- compile caches, warmed in the background beside the tests ------------------------------------------
# Every benchmark row that compiles (our Triton kernels with their autotune configs, torch.compile) runs once,
# untimed, in a few spawned processes at low priority: the timed runs below then load kernels and graphs from
# Triton's and Inductor's on-disk caches instead of spending their budgets compiling. (The tests are
# correctness checks: sharing the GPU does not change what they find.) It starts with the tests: both spend
# most of their time compiling, on 16 cores (run 4: 11 of 103 gpu-marked tests ran in their 50 s).
# The op rows first (4 processes), then the first model's (2: a ViT-B training step holds ~8 GB).
WARM_PID=""
start_prewarm() {  # start_prewarm SECONDS
  local warm_t=$1 warm_ops warm_model m1
  if [ "$DRY" = 1 ]; then
    warm_ops=(--quick --device cpu --ops layernorm gemm-configs); warm_model=(--quick --device cpu --models s)
  else
    m1=${GPU_CHECK_MODELS:-b s l}
    warm_ops=(--ops layernorm attention mlp patch_embed); warm_model=(--models "${m1%% *}")
    [ "$SWEEP" = 1 ] && warm_ops+=(gemm-configs)
  fi
  say "prewarm: compiling rows of the benchmarks in the background (${warm_t}s in all)"
  (
    export FLASHVIT_GPU_CHECK_BG=$BG_TAG
    T1=$SECONDS
    nice -n 10 timeout -k 10 $(( warm_t * 2 / 3 )) "$PY" -m flashvit.bench ops --prewarm-only \
      --prewarm "${GPU_CHECK_PREWARM:-4}" --rows all --budget $(( warm_t * 2 / 3 )) "${warm_ops[@]}"
    REST=$(( warm_t - (SECONDS - T1) ))
    [ "$REST" -lt 10 ] || nice -n 10 timeout -k 10 "$REST" "$PY" -m flashvit.bench model --prewarm-only \
      --prewarm 2 --budget "$REST" "${warm_model[@]}"
  ) > "$SHIM/.prewarm.log" 2>&1 &
  WARM_PID=$!
}

# ---- 2. the test suite on CUDA ------------------------------------------------------------------------
# Three pytest runs into one log: the gpu-marked tests first (what CI cannot run: bf16, big offsets, the
# kernel paths new since the last GPU run), the per-config ones apart (EVERY_MAX s), then everything else on
# CUDA with the test time that is left (CI runs those on CPU).
# SIGINT at each deadline: pytest stops its workers and still prints the failures so far (-rfE); KILL
# 15 s later if it has not exited.
run_tests() {  # run_tests SECONDS PYTEST_ARGS...
  local t=$1; shift
  say "tests: $* (timeout ${t}s) -> gpu_tests.log"
  timeout -s INT -k 15 "$t" "$PY" -m pytest -p no:cacheprovider -v -rfE --tb=short --maxfail=10 \
    --durations=15 -o faulthandler_timeout=100 "$@" >> "$OUT/gpu_tests.log" 2>&1
  local rc=$?
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || [ "$rc" -eq 2 ]; } &&
    note "tests: stopped by the ${t}s timeout (rc $rc; the log lists what ran)"
  say "tests: rc=$rc: $(grep -E '^=+ .*(passed|failed|error|no tests)' "$OUT/gpu_tests.log" | tail -n 1)"
  # A stopped run can leave xdist workers on the GPU: none of them may overlap the timings below.
  [ "$DRY" = 1 ] || { pkill -9 -f "pytest -p no:cacheprovider" 2>/dev/null; sleep 2; }
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]  # 5: nothing collected for this selection
}

if [ "$DRY" = 1 ]; then
  TEST_MAX=120; EVERY_MAX=30; RESERVE=100; XDIST=()
  GPU_SEL=(-m gpu tests/test_dispatch.py); REST_SEL=(-m "not gpu" tests/test_dispatch.py)
else
  TEST_MAX=${GPU_CHECK_TEST_MAX:-$(( TRAIN == 2 ? 200 : 150 ))}; EVERY_MAX=${GPU_CHECK_EVERY_TEST_MAX:-60}
  RESERVE=$(( 360 + (SWEEP == 1 ? 40 : 0) ))  # the benchmarks' steps after the tests
  XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_XDIST:-6}")
  # shellcheck disable=SC2206
  GPU_SEL=(-m gpu ${GPU_CHECK_TESTS:-tests bench}); REST_SEL=(-m "not gpu and not aot" ${GPU_CHECK_TESTS:-tests bench})
fi
if [ "$TESTS_ONLY" = 1 ]; then  # all of the budget but the report's; the per-config tests get a quarter of it
  RESERVE=25; TEST_MAX=$(( HARD - RESERVE )); EVERY_MAX=${GPU_CHECK_EVERY_TEST_MAX:-$(( TEST_MAX / 4 ))}
fi
TEST_T=$(min "$TEST_MAX" $(( $(left) - RESERVE )))
TESTS_RC=0
T_START=$SECONDS
if [ "$TARGETS" = 1 ]; then
  say "tests: not run (--targets)"
elif [ "$TEST_T" -lt 20 ]; then
  note "skipped: the test suite (only $(left)s left)"
  TESTS_RC=1
else
  : > "$OUT/gpu_tests.log"
  if [ -n "${GPU_CHECK_PRETEST:-}" ]; then  # one test alone first, full traceback (e.g. a failure to diagnose)
    say "pretest: $GPU_CHECK_PRETEST"
    # shellcheck disable=SC2086
    timeout -k 5 90 "$PY" -m pytest -p no:cacheprovider -q --tb=long $GPU_CHECK_PRETEST >> "$OUT/gpu_tests.log" 2>&1
    tail -n 25 "$OUT/gpu_tests.log"
    TEST_T=$(min "$TEST_T" $(( $(left) - RESERVE )))
  fi
  # The per-config kernel tests (names with "every") go in a pytest run of their own, after the others: a
  # config that faults (an illegal memory access poisons its worker's CUDA context) cannot fail the rest.
  [ "$TESTS_ONLY" = 1 ] || start_prewarm $(( TEST_T + 20 ))
  run_tests $(( TEST_T - EVERY_MAX > 20 ? TEST_T - EVERY_MAX : 20 )) "${XDIST[@]}" "${GPU_SEL[@]}" -k "not every" \
    || TESTS_RC=1
  run_tests $(( TEST_T - (SECONDS - T_START) > 20 ? TEST_T - (SECONDS - T_START) : 20 )) "${XDIST[@]}" \
    "${GPU_SEL[@]}" -k every || TESTS_RC=1
  REST_T=$(( TEST_T - (SECONDS - T_START) ))
  if [ "$REST_T" -ge 20 ]; then
    run_tests "$REST_T" "${XDIST[@]}" "${REST_SEL[@]}" || TESTS_RC=1
  else
    note "skipped: the non-gpu-marked tests on CUDA (only ${REST_T}s of test time left)"
  fi
fi
[ -n "$WARM_PID" ] || [ "$TESTS_ONLY" = 1 ] || [ "$TARGETS" = 1 ] || [ "$(left)" -lt "$(( RESERVE + 60 ))" ] ||
  start_prewarm 60  # the tests were skipped

# ---- the cache warm-up and the training run (--with-train) end before any timing starts ---------------------
if [ -n "$WARM_PID" ]; then
  wait "$WARM_PID"; rc=$?
  say "prewarm: rc=$rc$( [ "$rc" -ge 124 ] && echo ' (stopped by its timeout)'):"
  grep -E '^prewarm: ' "$SHIM/.prewarm.log" | cut -c1-300
  [ "$rc" -eq 0 ] || [ "$rc" -ge 124 ] || tail -n 5 "$SHIM/.prewarm.log"
fi
if [ "$TRAIN" = 2 ] && [ "$TRAIN_RC" -eq 0 ]; then
  say "train: waiting for the training run to end before the benchmarks"
  finish_train || TRAIN_RC=$?
fi
kill_background  # what the warm-up's or training's timeouts left behind

BENCH_RC=0
if [ "$TESTS_ONLY" != 1 ]; then  # (steps 3 and 4, to the summary)
# ---- 3. op benchmarks: the settled rows, then (own process) the kernel paths not yet run on a GPU ----------
if [ "$DRY" = 1 ]; then
  BENCH_COMMON=(--quick --device cpu); OPS_MAX=25; EXP_MAX=20; SWEEP_MAX=10; GRAPH_MAX=15; MODEL_MAX=40; GRACE=20
  OPS_EXTRA=(--ops layernorm attention); EXP_EXTRA=(--ops attention); GRAPH_EXTRA=(--ops layernorm)
  SWEEP_EXTRA=(); MODEL_EXTRA=(--models s)
  OPS_RESERVE=120; EXP_RESERVE=100; SWEEP_RESERVE=90; GRAPH_RESERVE=70; OVH_RESERVE=60
else
  BENCH_COMMON=(); OPS_MAX=${GPU_CHECK_OPS_MAX:-65}; EXP_MAX=${GPU_CHECK_EXP_MAX:-40}
  SWEEP_MAX=${GPU_CHECK_SWEEP_MAX:-40}; GRAPH_MAX=${GPU_CHECK_GRAPH_MAX:-50}; MODEL_MAX=${GPU_CHECK_MODEL_MAX:-100}
  GRACE=35
  OPS_EXTRA=(--warmup-ms 15 --rep-ms 60)
  # shellcheck disable=SC2206
  [ -n "${GPU_CHECK_OPS:-}" ] && OPS_EXTRA+=(--ops $GPU_CHECK_OPS)
  EXP_EXTRA=("${OPS_EXTRA[@]}"); GRAPH_EXTRA=(--warmup-ms 15 --rep-ms 60 --ops layernorm)
  SWEEP_EXTRA=(--warmup-ms 10 --rep-ms 40)
  # shellcheck disable=SC2206
  MODEL_EXTRA=(--models ${GPU_CHECK_MODELS:-b s l} --steps 12)  # (run 5's 8 left bimodal rows' medians unsettled)
  PROF_MAX=${GPU_CHECK_PROFILE_MAX:-20}
  # kept for the steps after each one
  # (model: MODEL_MAX + 60 s of grace and report; host profile 20 s; overhead 15; graph 50; sweep 40 when
  # asked; exp 40)
  PROF_RESERVE=160; OVH_RESERVE=185; GRAPH_RESERVE=205; SWEEP_RESERVE=255
  EXP_RESERVE=$(( 255 + (SWEEP == 1 ? 40 : 0) )); OPS_RESERVE=$(( EXP_RESERVE + 40 ))
fi
run_ops() {  # run_ops LABEL BUDGET_CAP RESERVE --rows WHICH EXTRA...
  local label=$1 cap=$2 reserve=$3; shift 3
  local b; b=$(min "$cap" $(( $(left) - reserve )))
  if [ "$b" -lt 10 ]; then
    note "skipped: $label (only $(left)s left)"
    return
  fi
  say "$label: budget ${b}s (timeout $(( b + GRACE ))s)"
  timeout -k 10 $(( b + GRACE )) "$PY" -m flashvit.bench ops --out "$OUT" --budget "$b" "${BENCH_COMMON[@]}" "$@" \
    > "$SHIM/.$label.log" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || { BENCH_RC=1; note "$label: exit code $rc$( [ "$rc" -ge 124 ] && echo ' (timeout)')"; }
  grep -E '^(ops|ops-experimental|ops-graph|gemm-configs): ' "$SHIM/.$label.log" | cut -c1-400
  [ "$rc" -eq 0 ] || tail -n 15 "$SHIM/.$label.log"
}
if [ "$TARGETS" = 1 ]; then
# ---- 3t. --targets: the rows the issues' speed targets read, nothing else -------------------------------
# shellcheck disable=SC2206
PARTS=(${GPU_CHECK_TARGETS:-attention mlp layernorm model})
has_part() { case " ${PARTS[*]} " in *" $1 "*) return 0 ;; esac; return 1; }
T_OPS=(); for p in attention mlp; do has_part "$p" && T_OPS+=("$p"); done
T_WARM=("${T_OPS[@]}"); has_part layernorm && T_WARM+=(layernorm)
if [ "$DRY" = 1 ]; then
  T_TIMING=(); T_PW=25; T_OPS_MAX=40; T_GRAPH_MAX=30; T_MODEL_MAX=40; T_MODEL=(--models s)
else
  T_TIMING=(--warmup-ms 15 --rep-ms 60); T_PW=${GPU_CHECK_PREWARM_MAX:-110}; T_OPS_MAX=${GPU_CHECK_OPS_MAX:-180}
  T_GRAPH_MAX=${GPU_CHECK_GRAPH_MAX:-130}; T_MODEL_MAX=${GPU_CHECK_MODEL_MAX:-70}; T_MODEL=(--models b --steps 12)
fi
# the model rows, in the budget's order (bench model runs the eager ones, then the block= ones): GPU_CHECK_MODEL_IMPLS
read -r -a T_MODEL_IMPLS <<< "${GPU_CHECK_MODEL_IMPLS:-timm timm+flashvit.patch graph(timm+flashvit.patch) \
timm+flashvit.patch[attn=split] timm+flashvit.patch[block=bias] timm+flashvit.patch[block=off]}"  # (no globbing)
# what each later step keeps back: the caps of the steps after it (those asked for) and 20 s for the report
T_R_MODEL=20; T_R_GRAPH=$T_R_MODEL; has_part model && T_R_GRAPH=$(( T_R_MODEL + T_MODEL_MAX ))
T_R_OPS=$T_R_GRAPH; has_part layernorm && T_R_OPS=$(( T_R_GRAPH + T_GRAPH_MAX ))
T_R_PW=$T_R_OPS; [ ${#T_OPS[@]} -gt 0 ] && T_R_PW=$(( T_R_OPS + T_OPS_MAX ))
PW=$(min "$T_PW" $(( $(left) - T_R_PW )))
if [ "$PW" -ge 10 ]; then  # every compiling row once: ops in 4 processes, ViT-B's patched model in one
  say "prewarm: the targets' compiling rows (${PW}s)"
  if [ ${#T_WARM[@]} -gt 0 ]; then
    FLASHVIT_GPU_CHECK_BG=$BG_TAG timeout -k 10 "$PW" "$PY" -m flashvit.bench ops --prewarm-only \
      --prewarm "${GPU_CHECK_PREWARM:-4}" --rows targets --budget "$PW" "${BENCH_COMMON[@]}" --ops "${T_WARM[@]}" \
      > "$SHIM/.prewarm.log" 2>&1 &
  fi
  if has_part model; then
    FLASHVIT_GPU_CHECK_BG=$BG_TAG timeout -k 10 "$PW" "$PY" -m flashvit.bench model --prewarm-only --prewarm 1 \
      --budget "$PW" "${BENCH_COMMON[@]}" "${T_MODEL[@]}" --impls timm+flashvit.patch > "$SHIM/.prewarm-model.log" 2>&1 &
  fi
  wait
  grep -hE '^prewarm: ' "$SHIM"/.prewarm*.log 2>/dev/null | cut -c1-300
  kill_background
fi
[ ${#T_OPS[@]} -gt 0 ] && run_ops ops "$T_OPS_MAX" "$T_R_OPS" --rows targets "${T_TIMING[@]}" --ops "${T_OPS[@]}"
CEIL=(); [ -f "$OUT/ops.json" ] && CEIL=(--ceilings-from "$OUT/ops.json")
has_part layernorm && run_ops ops-graph "$T_GRAPH_MAX" "$T_R_GRAPH" --rows targets --timer graph "${CEIL[@]}" \
  "${T_TIMING[@]}" --ops layernorm
if has_part model; then
  MODEL_B=$(min "$T_MODEL_MAX" $(( $(left) - T_R_MODEL )))
  if [ "$MODEL_B" -lt 10 ]; then
    note "skipped: model benchmarks (only $(left)s left)"
  else
    say "model: budget ${MODEL_B}s (timeout $(( MODEL_B + GRACE ))s)"
    timeout -k 10 $(( MODEL_B + GRACE )) "$PY" -m flashvit.bench model --out "$OUT" --budget "$MODEL_B" "${CEIL[@]}" \
      "${BENCH_COMMON[@]}" "${T_MODEL[@]}" --profile-steps "$PROFILE_STEPS" \
      --impls "${T_MODEL_IMPLS[@]}" > "$SHIM/.model.log" 2>&1
    rc=$?; [ "$rc" -eq 0 ] || { BENCH_RC=1; note "model: exit code $rc$( [ "$rc" -ge 124 ] && echo ' (timeout)')"; }
    grep -E '^model: ' "$SHIM/.model.log" | cut -c1-400
    [ "$rc" -eq 0 ] || tail -n 15 "$SHIM/.model.log"
  fi
fi
else  # (not --targets)
run_ops ops "$OPS_MAX" "$OPS_RESERVE" --rows settled "${OPS_EXTRA[@]}"
run_ops ops-experimental "$EXP_MAX" "$EXP_RESERVE" --rows experimental --ceilings-from "$OUT/ops.json" \
  "${EXP_EXTRA[@]}"
# Each GEMM tile config alone (compiled by the warm-up beside the tests): which config, if any, brings our GEMM
# near cuBLAS, and whether the TMA kernel's loop form (FLATTEN) matters.
if [ "$SWEEP" = 1 ] || [ "$DRY" = 1 ]; then
  run_ops gemm-configs "$SWEEP_MAX" "$SWEEP_RESERVE" --ops gemm-configs --ceilings-from "$OUT/ops.json" \
    "${SWEEP_EXTRA[@]}"
fi
# LayerNorm's rows again with device time only (CUDA graph replay), torch.compile included: its issue's targets
# are bandwidth and >= 1.0x torch.compile, and at these sizes the host takes longer to issue our Python autograd
# path than the GPU to run it. Every row: the backward's column chunks ([chunks]) are timed only here.
run_ops ops-graph "$GRAPH_MAX" "$GRAPH_RESERVE" --rows all --timer graph --ceilings-from "$OUT/ops.json" \
  "${GRAPH_EXTRA[@]}"

# ---- 3b. host overhead per op call and per train step (tiny shapes, real launches) ------------------------
OVH_B=$(min 15 $(( $(left) - OVH_RESERVE )))
if [ "$OVH_B" -lt 10 ]; then
  note "skipped: host-overhead benchmark (only $(left)s left)"
else
  say "overhead: budget ${OVH_B}s"
  OVH_QUICK=(); [ "$DRY" = 1 ] && OVH_QUICK=(--quick --device cpu)
  TRITON_INTERPRET=$DRY timeout -k 5 $(( OVH_B + 15 )) "$PY" -m flashvit.bench overhead --out "$OUT" \
    --budget "$OVH_B" "${OVH_QUICK[@]}" > "$SHIM/.overhead.log" 2>&1
  rc=$?; [ "$rc" -eq 0 ] || { BENCH_RC=1; note "overhead: exit code $rc"; tail -n 15 "$SHIM/.overhead.log"; }
  grep -E '^overhead: ' "$SHIM/.overhead.log" | cut -c1-400
fi
# Where the host time of a fwd+bwd call goes (cProfile per op), one launch's cost, and the kernels an MLP and a
# LayerNorm step run -> OUTDIR/profile/ (the CPU cannot say: its launches are stubbed or interpreted).
if [ "$DRY" != 1 ]; then
  PROF_B=$(min "$PROF_MAX" $(( $(left) - PROF_RESERVE )))
  if [ "$PROF_B" -lt 10 ]; then
    note "skipped: host profile (only $(left)s left)"
  else
    say "host profile: budget ${PROF_B}s -> profile/"
    timeout -k 5 "$PROF_B" "$PY" -m flashvit.bench.profile_host "$OUT/profile" --calls 100 > "$SHIM/.profile.log" 2>&1 ||
      note "host profile: exit code $? (files so far in profile/)"
  fi
fi

# ---- 4. model benchmarks --------------------------------------------------------------------------------
MODEL_B=$(min "$MODEL_MAX" $(( $(left) - 25 - GRACE )))
if [ "$MODEL_B" -lt 10 ]; then
  note "skipped: model benchmarks (only $(left)s left)"
else
  say "model: budget ${MODEL_B}s (timeout $(( MODEL_B + GRACE ))s)"
  timeout -k 10 $(( MODEL_B + GRACE )) "$PY" -m flashvit.bench model --out "$OUT" --budget "$MODEL_B" \
    --ceilings-from "$OUT/ops.json" "${BENCH_COMMON[@]}" "${MODEL_EXTRA[@]}" --profile-steps "$PROFILE_STEPS" \
    > "$SHIM/.model.log" 2>&1
  rc=$?; [ "$rc" -eq 0 ] || { BENCH_RC=1; note "model: exit code $rc$( [ "$rc" -ge 124 ] && echo ' (timeout)')"; }
  grep -E '^model: ' "$SHIM/.model.log" | cut -c1-400
  [ "$rc" -eq 0 ] || tail -n 15 "$SHIM/.model.log"
fi
fi  # (not --targets)
fi  # (not --tests-only)

# ---- 6. the targets' verdicts, and the summary, printed last -------------------------------------------------
rm -f "$OUT"/.*.tmp
if [ "$TESTS_ONLY" != 1 ]; then
  timeout -k 5 30 "$PY" -m flashvit.bench targets --out "$OUT" --summary "$OUT/targets.txt" > "$SHIM/.targets.log" 2>&1 ||
    note "targets: exit code $? ($(tail -n 1 "$SHIM/.targets.log" | cut -c1-200))"
fi
NOTE_ARGS=()
for n in "${NOTES[@]+"${NOTES[@]}"}"; do NOTE_ARGS+=(--note "$n"); done
[ "$TRAIN" = 2 ] && NOTE_ARGS+=(--note "train (--with-train): rc=$TRAIN_RC; $(grep -E 'test accuracy' "$OUT/train/train.log" 2>/dev/null | tail -n 1)")
NOTE_ARGS+=(--note "gpu_check: $(( SECONDS - T0 ))s of ${HARD}s; tests rc=$TESTS_RC; files: $(cd "$OUT" && ls | tr '\n' ' ')")
echo
REPORT_T=$(min 40 "$(left)"); [ "$REPORT_T" -ge 15 ] || REPORT_T=15
timeout -k 5 "$REPORT_T" "$PY" -m flashvit.bench report --out "$OUT" --tests-log "$OUT/gpu_tests.log" \
  --summary "$OUT/summary.txt" "${NOTE_ARGS[@]}"
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$TRAIN_RC" -eq 0 ]
