#!/usr/bin/env bash
# A GPU session in stages, each short enough for one 10-minute command on a lent machine
# (offline: torch, triton, pytest and peft must already be installed there; bitsandbytes
# travels as .carry/, made by tools/prepare_bitsandbytes.py, and is put on PYTHONPATH here).
#
# A lending of about 15 minutes (machine start included) takes one stage, run first
# (docs/gpu-session.md has the exact command for the device tool):
#
#   bash tools/gpu_session.sh first NAME [--budget-s S] [--steps a,b] [--groups P] [--resume]
#       # <= 420 s by its own budget: env, correctness, speed (the matrix first), CUDA build
#       # -> results/NAME.first.jsonl (tools/first.py), then its report (.first.md, .first.png)
#
# It runs from the tree as copied, installs nothing, and writes each figure as it is made.
# LOWRANK_FUSED_COMMIT names the commit in every row (.git does not travel; from git when here).
# The other stages need the package installed and suit longer lendings, in this order:
#
#   bash tools/gpu_session.sh probe NAME       # design-deciding figures -> results/NAME.probe.json
#   bash tools/gpu_session.sh build            # lowrank_fused._C for this GPU only
#   bash tools/gpu_session.sh test             # CUDA-tensor correctness of both backends
#   bash tools/gpu_session.sh bench NAME [-k EXPR]   # throughput + memory -> results/NAME.json
#   bash tools/gpu_session.sh policy NAME      # report, README table from NAME; the shipped tuning
#                                              # table from this GPU's tuning cache
#   bash tools/gpu_session.sh all NAME         # the five above, one after the other
#
# Dry run (no GPU; what CI does): GPU_SESSION_DRY_RUN=1, or --dry-run as the first argument.
# Every stage then runs on the CPU with the CPU shapes: GPU-only calls are skipped (build),
# tests are collected but not run (CI runs them itself), and nothing in the tree is written:
# results, the README copy and the tuning table go to GPU_SESSION_RESULTS (default: a temp dir).
#
# Results land in benchmarks/results/ (GPU_SESSION_RESULTS overrides) and, when $OUT is set
# (the device tool), are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
dry="${GPU_SESSION_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
[ "$dry" = "0" ] || dry=1
usage="stage: first NAME [options] | probe NAME | build | test | bench NAME [-k EXPR] | policy NAME | all NAME"
# The device machines' Python is python3; a plain python may be absent there.
python() { if command -v python >/dev/null 2>&1; then command python "$@"; else python3 "$@"; fi; }
stage="${1:?$usage}"
shift
# the slimmed bitsandbytes the device tool carries (tools/prepare_bitsandbytes.py)
if [ -d .carry ]; then export PYTHONPATH="$PWD/.carry${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ -z "${LOWRANK_FUSED_COMMIT:-}" ] && git rev-parse HEAD >/dev/null 2>&1; then
  LOWRANK_FUSED_COMMIT="$(git rev-parse HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo -dirty)"
  export LOWRANK_FUSED_COMMIT
fi

if [ "$dry" = 1 ]; then
  results="${GPU_SESSION_RESULTS:-$(mktemp -d -t gpu_session.XXXXXX)}"
  readme="$results/README.md"  # copies: the dry run never rewrites the real pages
  bench_page="$results/benchmarks.md"
  table_out="$results/shipped_table.json"
  echo "[dry run] CPU shapes, GPU-only calls skipped; outputs in $results"
else
  results="${GPU_SESSION_RESULTS:-benchmarks/results}"
  readme=README.md
  bench_page=docs/benchmarks.md
  table_out=lowrank_fused/tuning/shipped_table.json
fi
mkdir -p "$results"

gpu_name() {
  if [ "$dry" = 1 ]; then echo "cpu (dry run)"; else python -c "import torch; print(torch.cuda.get_device_name())"; fi
}
export_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp "$@" "$OUT/results/"; fi; }

probe() {
  name="${1:?probe NAME}"
  # a dry run: the first matrix point (first's dry run runs the whole plan)
  quick=()
  [ "$dry" = 0 ] || quick=(--quick)
  python -m tools.probe --out "$results/$name.probe.json" "${quick[@]}"
  gpu_name > "$results/$name.gpu.txt"
  export_out "$results/$name.probe.json" "$results/$name.gpu.txt"
}

build() {
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if [ "$dry" = 1 ]; then
    echo "[dry run] skipped: nvidia-smi and the CUDA extension build (LOWRANK_FUSED_BUILD_CUDA=1 pip install -e .)"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a == 9 else ''))")
    LOWRANK_FUSED_BUILD_CUDA=1 LOWRANK_FUSED_CUDA_ARCHS="$arch" MAX_JOBS=16 \
      python -m pip install --no-deps --no-build-isolation -e . -q
  fi
  python -c "from lowrank_fused import available_backends; print('backends:', available_backends())"
}

run_tests() {
  files=(tests/test_csrc.py tests/test_triton.py tests/test_dropout_mask.py tests/test_peft.py)
  # the full products of the parametrised kernel tests, not CI's pairwise cover (tests/pairwise.py)
  export LOWRANK_FUSED_EXHAUSTIVE=1
  if [ "$dry" = 1 ]; then
    python -m pytest "${files[@]}" -q --collect-only "$@" | tail -n 1
  else
    python -m pytest "${files[@]}" -q -x "$@"
  fi
}

bench() {
  name="${1:?bench NAME}"; shift
  # The ratios come from each case's own timing, interleaved with the bare layer (tools/timing.py,
  # the timer tools.first uses; extra_info); pytest-benchmark's timer only adds rounds, so it is
  # kept short. A dry run keeps it to one round: it checks the
  # suite and the JSON, not speed.
  timers=(--benchmark-min-rounds=3 --benchmark-max-time=0.05)
  [ "$dry" = 0 ] || timers=(--benchmark-min-rounds=1 --benchmark-max-time=0 --benchmark-warmup=off)
  python -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$results/$name.json" \
    "${timers[@]}" "$@"
  gpu_name > "$results/$name.gpu.txt"
  export_out "$results/$name.json" "$results/$name.gpu.txt"
}

policy() {
  name="${1:?policy NAME}"
  if [ "$dry" = 1 ]; then cp README.md "$readme"; cp docs/benchmarks.md "$bench_page"; fi
  # the README holds the headline GPU table, docs/benchmarks.md the model-level one
  python -m tools.report "$results/$name.json" --markdown "$results/$name.md" \
    --plot "$results/$name.png" --readme "$readme" --readme "$bench_page"
  export_out "$results/$name.md" "$results/$name.png" "$readme" "$bench_page"
  tuning_table "$name"
}

# The shipped tuning table (what "auto" decided on this GPU: each key's winner among the fused
# backends and the reference, and the kernels' launch configs) from this GPU's tuning cache
# file, kept beside the results; a dry run builds it from a sample cache of a made-up GPU.
tuning_table() {
  name="$1"
  if [ "$dry" = 1 ]; then
    cache="$(python -m tools.tuning_table --sample-cache "$results/$name.tuning-sample")"
  else
    cache="$(python -c "import torch; from lowrank_fused import tuning; print(tuning.tuner().store(torch.device('cuda')).path)")"
  fi
  if [ ! -f "$cache" ]; then
    echo "no tuning cache at $cache (nothing ran backend='auto' on this GPU): $table_out left as it is"
    return 0
  fi
  cp "$cache" "$results/$name.tuning.json"
  python -m tools.tuning_table "$results/$name.tuning.json" --out "$table_out" --source "$name"
  export_out "$results/$name.tuning.json" "$table_out"
}

first() {
  name="${1:?first NAME [--budget-s S] [--steps a,b] [--groups P] [--resume]}"; shift
  flag=()
  [ "$dry" = 0 ] || flag=(--dry-run)
  rc=0
  python -m tools.first "$name" --results "$results" "${flag[@]}" "$@" || rc=$?
  # the report, whatever the run's end: the table lands at the end of the output
  python -m tools.report "$results/$name.first.jsonl" --markdown "$results/$name.first.md" \
    --plot "$results/$name.first.png" || rc=$((rc ? rc : 1))
  if [ -n "${OUT:-}" ]; then
    for f in "$results/$name.first.md" "$results/$name.first.png"; do
      if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
    done
  fi
  return "$rc"
}

case "$stage" in
  first) first "$@" || exit $? ;;
  probe) probe "$@" ;;
  build) build ;;
  test) run_tests "$@" ;;
  bench) bench "$@" ;;
  policy) policy "$@" ;;
  all)
    name="${1:?all NAME}"
    for s in probe build test bench policy; do
      echo "== stage $s"
      case "$s" in
        probe|bench|policy) "$s" "$name" ;;
        test) run_tests ;;
        *) "$s" ;;
      esac
    done
    ;;
  *) echo "unknown stage $stage; $usage" >&2; exit 2 ;;
esac
