#!/bin/sh
# One 15-minute `device` session, as two calls on the same warm machine. A call carries at most
# 64 MiB, so CIFAR-10 (.gpu-data/cifar10, 57 MiB) and the wheels (.whl, 17 MiB) travel in
# different calls; the classification path needs none of the wheels.
# Prepare here with `sh benchmarks/gpu_wheels.sh cifar10`, then:
#   call 1: sh benchmarks/gpu_session.sh speed                                   carry .whl, .gpu-data/clip_tokenizer (~6.5 min)
#   call 2: TABLE_SECONDS=S sh benchmarks/gpu_session.sh table [recipe|random10|others|trials] [LABEL [key=value ...]]
#           carry .gpu-data/cifar10 (~5-8 min)
# Issue call 2 at once: the machine is given back after 30 s idle. Both calls whole need a little
# more than 15 minutes with the start, so the table goes second, under TABLE_SECONDS (default 520):
# give it what the session has left less about a minute. The reference recipe runs first and is
# scored even when the limit stops the fast variant after it.
# `table recipe` (the default): the original model with the reference recipe (182 epochs) and
# with the fast recipe at batch 256, each then scored on the exact-pixel test images against their JPEG copies
# (benchmarks/classification_jpeg.py --score). `random10`, `others`, `trials`: gpu_tables.sh's tables.
# `speed`: gpu_check.py with the test suite on CUDA (alone), then the SD v1.4 SalUn step in fp32
# and bf16 eager and bf16 compiled (~2 min of compiling); its summary keeps each failed test's traceback.
# Everything lands in $OUT (the folder the device returns), at most 8 files.
PART=${1:?table or speed}
if [ "$PART" = table ]; then TABLE=${2:-recipe}; LABEL=${3:-h100}; fi  # speed: gpu_check.py names its own files
if [ $# -gt 3 ]; then shift 3; else set --; fi  # the rest: overrides for every table (the tests run it tiny this way)
case $PART:${TABLE:-} in
table:recipe|table:random10|table:others|table:trials|speed:) ;;
*) echo "unknown part '$*': table [recipe|random10|others|trials] [LABEL [key=value ...]], or speed" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder the results go to (the device sets it)}"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DATA_DIR=${DATA_DIR:-.gpu-data/cifar10}  # cifar10_full_jpeg_q75.npz and the exact test images (gpu_wheels.sh cifar10)
case $PART in
table)
    RUNS=${RUNS:-runs/classification}
    CIFAR10=$DATA_DIR/cifar10_full_jpeg_q75.npz timeout "${TABLE_SECONDS:-520}" sh benchmarks/gpu_tables.sh "$TABLE" "$LABEL" "$@" >"$OUT/table.log" 2>&1
    echo "table exit $?"
    grep -vE "it/s|s/it" "$OUT/table.log" | tail -20
    if [ "$TABLE" = recipe ]; then
        for run in reference fast-b256; do
            original=$RUNS/recipe-$run/original  # the run's own config.yaml builds its network
            [ -f "$original/model.safetensors" ] || continue
            ${PYTHON:-python3} benchmarks/classification_jpeg.py "$DATA_DIR" --score "$original/config.yaml" "$original/model.safetensors" \
                --label "$LABEL-$run-score" --out "$OUT" | tail -2
        done
    fi
    ;;
speed)
    timeout 560 ${PYTHON:-python3} benchmarks/gpu_check.py --wheels .whl --tokenizer .gpu-data/clip_tokenizer --budget 540 --compile \
        --skip demo ddpm-bf16 sd-tiny classification esd-step generation
    ;;
esac
