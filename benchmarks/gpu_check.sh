#!/usr/bin/env bash
# The CUDA check of issue 19, in one command: CUDA tests, then `ncatool bench --device cuda` at
# GPU-sized work, then (if time is left) the compiled backend. Budget: under 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh OUT.json       # from the repository root, on a machine with CUDA
#
# Python: the `python3` on PATH (else `python`), the GPU machine's own PyTorch and Triton (there
# PyTorch 2.11 + CUDA 13, Triton 3.6, not this project's pins). Nothing here installs torch; ncatool
# is installed with `pip install --no-deps --no-build-isolation -e .` only if it is not importable
# (the machine reaches no package index), and the CUDA tests run without tests/conftest.py
# (--noconftest: it needs the image libraries, nibabel and SimpleITK, which the bench does not).
#
# Steps (each one's seconds and exit status go into OUT.json under "steps"):
#   1. tests/test_cuda.py, eager backends: fast step on CUDA == reference (float32, TF32 off; bf16
#      within its bound), 2D and 3D, inference and training.                         ~30 s
#   2. ncatool bench --device cuda --gpu-sizes -r 3 --no-memory, 2D then 3D (two runs, so that a
#      timeout loses one half only): 2D 256^2 x 32 (inference 64 steps, training 32), 3D 128^3 x 2
#      (10+10 steps, inference and training), 256^3 x 1 M3D-NCA inference; naive, naive-tuned,
#      fp32, bf16 (+ckpt1 in training); cell-updates/s, both ratios, peak GPU memory per run,
#      roofline fractions (bf16/fp32 products, copy bandwidth measured first).     ~2-3 min
#   3. tests/test_cuda.py, compiled backend (torch.compile of the step; Inductor -> Triton).  ~1-2 min
#   4. ncatool bench, 2D only, fp32/bf16 eager against +compile (cold compiles included in the
#      warm-up, not in the timings).                                                ~1-2 min
# Every step runs under `timeout` (120 + 150 + 200 s at most for steps 1-2); steps 3 and 4 start
# only while the elapsed time leaves them room, so the whole script ends within 8 minutes. It
# exits non-zero if a step failed; OUT.json is written anyway, step by step.
#
# OUT.json: {"gpu", "torch", "steps": {name: {"rc", "seconds"}}, "bench_2d", "bench_3d",
# "bench_compile": <ncatool bench reports>}. The tables are printed on stderr as the bench runs.
#
# To try the plumbing on a CPU (tiny sizes, the CUDA tests skip):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZES="--size2d 8 --steps2d 2 --batch2d 1 --size3d 8 --batch3d 1" \
#       bash benchmarks/gpu_check.sh /tmp/gpu_check.json
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT.json" >&2
    exit 2
fi
OUT_JSON=$(realpath -m "$1")
mkdir -p "$(dirname "$OUT_JSON")"
cd "$(dirname "$0")/.."

PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ncatool-inductor}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
BUDGET=460 # seconds: steps 3 and 4 start only while this leaves them room (all steps: < 8 min)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
read -r -a SIZES <<<"${GPU_CHECK_SIZES:---gpu-sizes}"

if ! "$PY" -c "import ncatool, ncatool.bench, typer, rich" 2>/dev/null; then
    echo "== ncatool not importable: pip install --no-deps --no-build-isolation -e ." >&2
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi
"$PY" - "$OUT_JSON" "$DEVICE" <<'EOF'
import json, sys, torch
path, device = sys.argv[1:]
if device.startswith("cuda"):
    assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
    gpu = torch.cuda.get_device_name()
else:
    gpu = None
print(f"== {gpu or device} | torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
doc = {"script": "benchmarks/gpu_check.sh", "gpu": gpu, "torch": torch.__version__, "steps": {}}
open(path, "w").write(json.dumps(doc, indent=2) + "\n")
EOF

# record NAME RC SECONDS [REPORT.json KEY]: a step's outcome (and its report) into OUT.json
record() {
    "$PY" - "$OUT_JSON" "$@" <<'EOF'
import json, sys
path, name, rc, seconds, *report = sys.argv[1:]
doc = json.load(open(path))
doc["steps"][name] = {"rc": int(rc), "seconds": int(seconds)}
if report:
    try:
        doc[report[1]] = json.load(open(report[0]))
    except (OSError, ValueError):
        doc[report[1]] = None
open(path, "w").write(json.dumps(doc, indent=2) + "\n")
EOF
}

FAILED=0
# run NAME LIMIT_S [REPORT.json KEY] -- CMD...: one step under `timeout`, its outcome recorded
run() {
    local name=$1 limit=$2 report=() rc=0 start=$SECONDS
    shift 2
    if [[ $1 != "--" ]]; then
        report=("$1" "$2")
        shift 2
    fi
    shift
    echo "== [$SECONDS s] $name (at most $limit s): $*" >&2
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    echo "== [$SECONDS s] $name: exit $rc after $((SECONDS - start)) s" >&2
    record "$name" "$rc" "$((SECONDS - start))" ${report[@]+"${report[@]}"}
    if [[ $rc -ne 0 ]]; then FAILED=1; fi
}

PYTEST=("$PY" -m pytest -q --noconftest -p no:cacheprovider --timeout=240 tests/test_cuda.py)

run tests_eager 120 -- "${PYTEST[@]}" -k "not compiled"

# 2D and 3D apart: a report is written when its bench ends, so a timeout loses one half only
BENCH=("$PY" -m ncatool bench --device "$DEVICE" "${SIZES[@]}" -r 3 --no-memory)
run bench_2d 150 "$WORK/bench_2d.json" bench_2d -- \
    "${BENCH[@]}" --only infer2d --only train2d --out "$WORK/bench_2d.json"
run bench_3d 200 "$WORK/bench_3d.json" bench_3d -- \
    "${BENCH[@]}" --only infer3d --only train3d --out "$WORK/bench_3d.json"

left=$((BUDGET - SECONDS))
if [[ $left -gt 60 ]]; then
    run tests_compiled $((left < 120 ? left : 120)) -- "${PYTEST[@]}" -k "compiled"
else
    echo "== skipped tests_compiled: ${left} s left of the ${BUDGET} s budget" >&2
fi

left=$((BUDGET - SECONDS))
if [[ $left -gt 90 ]]; then
    run bench_compile "$left" "$WORK/bench_compile.json" bench_compile -- \
        "${BENCH[@]}" --only infer2d --only train2d --variant fp32 --variant bf16 \
        --variant fp32+compile --variant bf16+compile --out "$WORK/bench_compile.json"
else
    echo "== skipped bench_compile: ${left} s left of the ${BUDGET} s budget" >&2
fi

echo "== [$SECONDS s] done; report: $OUT_JSON" >&2
exit "$FAILED"
