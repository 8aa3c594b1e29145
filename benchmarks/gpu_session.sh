#!/bin/sh
# One 15-minute `device` session, as calls on one warm machine. A call carries at most 64 MiB,
# so CIFAR-10 (.gpu-data/cifar10, 57 MiB) and the wheels (.whl, 17 MiB) travel in different
# calls; the classification path needs none of the wheels. Prepare here with
# `sh benchmarks/gpu_wheels.sh cifar10`. The machine goes back after 30 s idle: issue each call
# as soon as the one before returns.
#
# The usual session: a CIFAR-10 table trains while the test suite runs beside it on the same GPU
# (a table's accuracies do not depend on what else runs there; its times do):
#   call 1: sh benchmarks/gpu_session.sh background [recipe|random10|others|trials] [LABEL [key=value ...]]
#           carry .gpu-data/cifar10; returns at once, the table training on (setsid) from a copy in $WORK
#   call 2: sh benchmarks/gpu_session.sh beside [SECONDS]       carry .whl, .gpu-data/clip_tokenizer
#           gpu_check.py's correctness parts (tests, demo, ddpm-bf16, sd-tiny, classification) with
#           --budget SECONDS (default 300), then waits for the table until WAIT seconds (default 560)
#           from its own start, and packs what the table wrote into $OUT/table.tgz
# Or one part alone, in the foreground:
#   table [recipe|random10|others|trials] [LABEL [key=value ...]]  carry .gpu-data/cifar10; under TABLE_SECONDS (default 520)
#   speed                                                          carry .whl, .gpu-data/clip_tokenizer (~6.5 min)
# `table recipe` (the default): the original model with the reference recipe (182 epochs; about
# 7.5 min on one H100 beside the test suite) and with the fast recipe at batch 256, each then scored
# on the exact-pixel test images against their JPEG copies (benchmarks/classification_jpeg.py --score).
# `random10`, `others`, `trials`: gpu_tables.sh's tables.
# `speed`: gpu_check.py with the test suite on CUDA (alone), then the SD v1.4 SalUn step in fp32
# and bf16 eager and bf16 compiled; its summary keeps each failed test's traceback. A background
# table still training is stopped first.
# Everything lands in $OUT (the folder the device returns), at most 8 files.
PART=${1:?background, beside, table or speed}
case $PART in table | background) TABLE=${2:-recipe}; LABEL=${3:-h100} ;; esac  # speed, beside: gpu_check.py names its files
if [ "$PART" = beside ]; then BUDGET=${2:-300}; fi
if [ $# -gt 3 ]; then shift 3; else set --; fi  # the rest: overrides for every table (the tests run it tiny this way)
case $PART:${TABLE:-} in
table:recipe|table:random10|table:others|table:trials|background:recipe|background:random10|background:others|background:trials|speed:|beside:) ;;
*) echo "unknown part '$PART ${TABLE:-}': background|table [recipe|random10|others|trials] [LABEL [key=value ...]], beside [SECONDS] or speed" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder the results go to (the device sets it)}"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DATA_DIR=${DATA_DIR:-.gpu-data/cifar10}  # cifar10_full_jpeg_q75.npz and the exact test images (gpu_wheels.sh cifar10)
WORK=${WORK:-/tmp/erasure-table}  # the background table's copy of the code and data, and its results
case $PART in
table)
    RUNS=${RUNS:-runs/classification}
    CIFAR10=$DATA_DIR/cifar10_full_jpeg_q75.npz timeout "${TABLE_SECONDS:-520}" sh benchmarks/gpu_tables.sh "$TABLE" "$LABEL" "$@" >"$OUT/table.log" 2>&1
    echo "table exit $?"
    # The progress bar's last state (the classification bar shows validation accuracy), then the rest of the log.
    tr '\r' '\n' <"$OUT/table.log" | grep -E "it/s|s/it" | tail -1
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
background)
    # From copies: the next call sends the working tree again, which must not touch the running job.
    # $WORK/repo/runs stays, so a later table on the same warm machine reuses its finished stages.
    rm -rf "$WORK/out" "$WORK/exit" "$WORK/data" && mkdir -p "$WORK/repo" "$WORK/out"
    cp -r erasure benchmarks configs "$WORK/repo/" && cp -r "$DATA_DIR" "$WORK/data"
    quoted=$(for a in "$@"; do printf "'%s' " "$a"; done)
    cat >"$WORK/run.sh" <<EOF
cd "$WORK/repo" && DATA_DIR="$WORK/data" OUT="$WORK/out" TABLE_SECONDS=${TABLE_SECONDS:-1800} sh benchmarks/gpu_session.sh table $TABLE $LABEL $quoted
echo \$? >"$WORK/exit"
EOF
    setsid sh "$WORK/run.sh" >"$WORK/session.log" 2>&1 </dev/null &
    echo "table $TABLE training in the background from $WORK; collect it with: sh benchmarks/gpu_session.sh beside"
    ;;
beside)
    start=$(date +%s)
    timeout $((BUDGET + 20)) ${PYTHON:-python3} benchmarks/gpu_check.py --wheels .whl --tokenizer .gpu-data/clip_tokenizer \
        --budget "$BUDGET" --skip sd-step esd-step generation
    while [ ! -f "$WORK/exit" ] && [ $(($(date +%s) - start)) -lt "${WAIT:-560}" ]; do sleep 5; done
    if [ -f "$WORK/exit" ]; then echo "background table finished"; else echo "background table still running: packing what it wrote so far"; fi
    cat "$WORK/session.log"
    tar czf "$OUT/table.tgz" -C "$WORK" out session.log
    ;;
speed)
    if [ -f "$WORK/run.sh" ] && [ ! -f "$WORK/exit" ]; then  # a background table would share the GPU with the timings
        pkill -f "$WORK/" && echo "stopped the background table in $WORK"
    fi
    timeout 560 ${PYTHON:-python3} benchmarks/gpu_check.py --wheels .whl --tokenizer .gpu-data/clip_tokenizer --budget 540 --compile \
        --skip demo ddpm-bf16 sd-tiny classification esd-step generation
    ;;
esac
