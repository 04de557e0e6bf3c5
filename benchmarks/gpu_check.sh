#!/usr/bin/env bash
# Issue 13's GPU check, in one run on a fresh GPU machine (Python 3.12 with its own CUDA build of torch, no
# network), from the repository root:
#
#     bash benchmarks/gpu_check.sh                          # on the GPU machine, with .wheelhouse/ beside it
#     GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh     # dry run on a CPU: the same steps, tiny sizes
#
# Steps, in order of value (each under its own time limit; a failed step does not stop the next ones):
#   install  the wheels of $WHEELHOUSE (made by benchmarks/make_wheelhouse.sh) whose package the machine lacks,
#            with --no-deps and --no-index (the machine's torch is never touched), then this package (--no-deps);
#   device   the device-parametrised tests (pytest -m device: GraTa's step against the plain reference, its Adam,
#            per-view BatchNorm, the strong augmentation, TTAHandler) on cpu and cuda; a skipped cuda test fails;
#   job      the main job: inference.json --device $GPU_CHECK_DEVICE (on random weights, said so in the summary,
#            if the shipped source model was left behind);
#   bench    benchmarks/tta_speed.py at each size of $GPU_CHECK_SIZES, batch size 1: ms per image, ratio to plain
#            inference, peak GPU memory against plain inference and a training step;
#   suite    the rest of the test suite (pytest -m "not device"; on CUDA only, it is CI's on the CPU).
# Output, in $OUT (default outputs/gpu_check; at most 8 files, no sub-folders): summary.txt (machine, versions,
# step results, the benchmark tables), one log per step, tta_speed.json, inference.tar.gz. The exit status is the
# number of failed steps. The whole run stops by itself after $GPU_CHECK_BUDGET_S seconds (default 540).
#
# Other variables: WHEELHOUSE (.wheelhouse), PYTHON (python3), GPU_CHECK_STEPS ("install device job bench suite";
# dry run without suite), GPU_CHECK_SIZES ("256 512"; dry run "64"), GPU_CHECK_REPEATS (20; dry run 1),
# GPU_CHECK_WORKERS (pytest-xdist workers for the suite where xdist is installed, default 4; 0: none),
# GPU_CHECK_METHODS (the registered adapters tta_speed.py also times, default "all": the speed column of Table 1;
# empty: none).
# shellcheck disable=SC2317  # the step_* functions are called by name
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
WORKERS=${GPU_CHECK_WORKERS:-4}
read -r -a METHODS <<<"${GPU_CHECK_METHODS-all}"
if [ "$DEVICE" = cuda ]; then
    STEPS=${GPU_CHECK_STEPS:-install device job bench suite}
    SIZES=${GPU_CHECK_SIZES:-256 512}
    REPEATS=${GPU_CHECK_REPEATS:-20}
    WARMUP=10
    JOB_ARGS=()
else
    STEPS=${GPU_CHECK_STEPS:-install device job bench}
    SIZES=${GPU_CHECK_SIZES:-64}
    REPEATS=${GPU_CHECK_REPEATS:-1}
    WARMUP=0
    JOB_ARGS=(--image_size 64 --max_images 2)
fi
OUT=${OUT:-$REPO/outputs/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
FAILED=0

say() { echo "$*" | tee -a "$SUMMARY"; }

# limit CAP: seconds a step may take, at most CAP and what is left of the budget (less 15 s to write up)
limit() {
    local left=$((BUDGET - SECONDS - 15))
    echo $((left < $1 ? left : $1))
}

# run LOG CAP CMD...: run CMD under the time limit, appending its output to $OUT/LOG.log; return its status
run() {
    local log=$1 cap=$2 seconds
    shift 2
    seconds=$(limit "$cap")
    if [ "$seconds" -lt 20 ]; then
        echo "no time left for: $*" | tee -a "$OUT/$log.log"
        return 124
    fi
    echo "\$ $* (limit ${seconds}s)" | tee -a "$OUT/$log.log"
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$OUT/$log.log"
    return "${PIPESTATUS[0]}"
}

# result NAME STATUS [NOTE]: record a step's outcome
result() {
    local status=$2 outcome=ok
    [ "$status" -eq 124 ] && outcome="TIMED OUT"
    [ "$status" -ne 0 ] && [ "$status" -ne 124 ] && outcome="FAILED (status $status)"
    [ "$status" -ne 0 ] && FAILED=$((FAILED + 1))
    say "step $1: $outcome${3:+ - $3} (at $SECONDS s)"
}

step_install() {
    # the wheels whose package is not installed here, never replacing one that is (torch above all)
    local missing status
    mapfile -t missing < <("$PY" - "$WHEELHOUSE" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

folder = pathlib.Path(sys.argv[1])
for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
    try:
        md.distribution(wheel.name.split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
    say "wheelhouse $WHEELHOUSE: $(ls "$WHEELHOUSE"/*.whl 2>/dev/null | wc -l) wheels, ${#missing[@]} to install"
    status=0
    if [ "${#missing[@]}" -gt 0 ]; then
        local pip=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check)
        if ! run install 240 "$PY" "${pip[@]}" "${missing[@]}"; then
            say "installing into the environment failed: installing into $WORK/site, on PYTHONPATH"
            run install 240 "$PY" "${pip[@]}" --target "$WORK/site" "${missing[@]}" || status=1
            export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
        fi
    fi
    # this package, unless already installed from this checkout (checked from outside it)
    if (cd / && "$PY" -c "import monai_grata, os, sys; sys.exit(not monai_grata.__file__.startswith('$REPO/'))") \
        2>/dev/null; then
        say "monai_grata: already installed from $REPO"
    elif ! run install 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e .; then
        say "installing monai_grata failed: using it from $REPO on PYTHONPATH"
        export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    fi
    run install 120 "$PY" - "$DEVICE" <<'EOF' || status=1
import sys

import fire, ignite, jsonschema, mlflow, monai, nibabel, sqlalchemy, torch  # noqa: F401, E401
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401  (the bundle's sqlite store)

import monai_grata.handlers  # noqa: F401

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), monai {monai.__version__}, "
      f"ignite {ignite.__version__}, mlflow {mlflow.__version__}, cuda available: {torch.cuda.is_available()}")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available to torch")
EOF
    return "$status"
}

step_device() {
    run device 240 "$PY" -m pytest -q -p no:cacheprovider -rs -m device tests || return 1
    if [ "$DEVICE" = cuda ] && grep -q "no CUDA" "$OUT/device.log"; then
        say "cuda variants were skipped"
        return 1
    fi
}

step_job() {
    local ckpt=() model=bundles/grata/models/source_refuge_train.pt status
    if [ ! -f "$model" ]; then
        JOB_NOTE="on random weights: $model was left behind, so its Dice means nothing"
        "$PY" -c "import torch; from monai_grata.networks import resunet, save_half_precision; torch.manual_seed(0); \
save_half_precision(resunet(), '$WORK/random_source.pt')" 2>&1 | tee -a "$OUT/job.log"
        ckpt=(--ckpt_path "$WORK/random_source.pt")
    fi
    run job 300 "$PY" -m monai.bundle run --config_file bundles/grata/configs/inference.json --device "$DEVICE" \
        --output_dir "$WORK/inference" "${JOB_ARGS[@]}" "${ckpt[@]}"
    status=$?
    if [ -f "$WORK/inference/metrics.json" ]; then
        say "job metrics.json: $(tr -d '\n' <"$WORK/inference/metrics.json")"
    elif [ "$status" -eq 0 ]; then
        say "the job wrote no metrics.json"
        status=1
    fi
    [ -d "$WORK/inference" ] && tar -czf "$OUT/inference.tar.gz" -C "$WORK" inference
    return "$status"
}

step_bench() {
    local size status=0
    for size in $SIZES; do
        run tta_speed 240 "$PY" benchmarks/tta_speed.py --device "$DEVICE" --image_size "$size" --batch_size 1 \
            --repeats "$REPEATS" --warmup "$WARMUP" --json "$WORK/tta_speed_$size.json" \
            ${METHODS[@]+--methods "${METHODS[@]}"} || status=1
    done
    "$PY" - "$OUT/tta_speed.json" "$WORK"/tta_speed_*.json <<'EOF'
import json
import os
import sys

results = [json.load(open(path)) for path in sys.argv[2:] if os.path.exists(path)]
json.dump(results, open(sys.argv[1], "w"), indent=1)
EOF
    return "$status"
}

step_suite() {
    local xdist=()
    if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n "$WORKERS" --dist loadfile)
    fi
    run suite 480 "$PY" -m pytest -q -p no:cacheprovider -rs -m "not device" "${xdist[@]}" tests
}

say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, steps: $STEPS, output $OUT"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PY" --version 2>&1), $(uname -m)"
if command -v nvidia-smi >/dev/null; then
    say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
fi
JOB_NOTE=
for name in $STEPS; do
    case $name in
    install | device | job | bench | suite)
        "step_$name"
        status=$?
        result "$name" "$status" "$([ "$name" = job ] && echo "$JOB_NOTE")"
        if [ "$name" = install ] && [ "$FAILED" -gt 0 ]; then
            say "stopping: without the packages no other step can run"
            break
        fi
        ;;
    *) say "unknown step $name (steps: install device job bench suite)" && FAILED=$((FAILED + 1)) ;;
    esac
done
if [ -f "$OUT/tta_speed.log" ]; then
    grep -v '^\$ ' "$OUT/tta_speed.log" >>"$SUMMARY"
fi
for log in device suite; do
    [ -f "$OUT/$log.log" ] && say "pytest $log: $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/$log.log" | tail -1)"
done
say "gpu_check done in $SECONDS s: $FAILED failed step(s)"
rm -rf "$WORK"
exit "$FAILED"
