#!/usr/bin/env bash
# A GPU session in stages, each short enough for one 10-minute command on a lent machine
# (offline: torch, triton, pytest and peft must already be installed there).
#
#   bash benchmarks/gpu_session.sh build            # lowrank_fused._C for this GPU only
#   bash benchmarks/gpu_session.sh test             # CUDA-tensor correctness of both backends
#   bash benchmarks/gpu_session.sh bench NAME [-k EXPR]   # throughput + memory -> results/NAME.json
#   bash benchmarks/gpu_session.sh policy NAME      # report, README table, auto policy from NAME
#
# Results land in benchmarks/results/ and, when $OUT is set (the device tool), are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:?stage: build | test | bench NAME [-k EXPR] | policy NAME}"
shift
results=benchmarks/results

gpu_name() { python -c "import torch; print(torch.cuda.get_device_name())"; }
export_out() { if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp "$@" "$OUT/results/"; fi; }

case "$stage" in
  build)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    arch=$(python -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a == 9 else ''))")
    LOWRANK_FUSED_BUILD_CUDA=1 LOWRANK_FUSED_CUDA_ARCHS="$arch" MAX_JOBS=16 \
      python -m pip install --no-deps --no-build-isolation -e . -q
    python -c "from lowrank_fused import available_backends; print('backends:', available_backends())"
    ;;
  test)
    python -m pytest tests/test_csrc.py tests/test_triton.py tests/test_peft.py -q -x "$@"
    ;;
  bench)
    name="${1:?bench NAME}"; shift
    python -m pytest benchmarks -q --benchmark-json="$results/$name.json" "$@"
    gpu_name > "$results/$name.gpu.txt"
    export_out "$results/$name.json" "$results/$name.gpu.txt"
    ;;
  policy)
    name="${1:?policy NAME}"
    python -m benchmarks.report "$results/$name.json" --markdown "$results/$name.md" \
      --plot "$results/$name.png" --readme README.md
    python -m benchmarks.auto_policy "$results/$name.json"
    export_out "$results/$name.md" "$results/$name.png" lowrank_fused/auto_policy.json README.md
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
