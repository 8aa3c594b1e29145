#!/bin/sh
# One 15-minute `device` session, as two calls on the same warm machine. A call carries at most
# 64 MiB, so CIFAR-10 (54 MB) and the NudeNet wheel (11 MB) travel in different calls.
# Prepare here with `sh benchmarks/gpu_wheels.sh cifar10`, then:
#   call 1: sh benchmarks/gpu_session.sh table [recipe|random10] [LABEL]   carry .whl-lite, .gpu-data/cifar10_full_jpeg_q75.npz (~8 min)
#   call 2: sh benchmarks/gpu_session.sh speed [LABEL]                     carry .whl, .gpu-data/clip_tokenizer (~4 min)
# Issue call 2 at once: the machine is given back after 30 s idle.
# `table`: CIFAR-10 work in the foreground and the CUDA test suite beside it (a table's
# accuracies do not depend on what else shares the GPU; its times do, and are not reported
# as timings). `recipe` (the default) trains the original model with the reference recipe
# (182 epochs) and the fast recipe at batch 256: can the JPEG copy reach 94% at all?
# `random10`: the random-10% table with Retrain, RL, and SalUn through its lr x mask-mode
# sweep. The tests that need NudeNet fail in this call, for want of its wheel; `speed` runs them last.
# `speed`: the SD v1.4 SalUn step in fp32 and bf16 eager, then bf16 compiled (~2 min of
# compiling), alone on the GPU; then the NudeNet tests.
# Everything lands in $OUT (the folder the device returns), at most 8 files.
PART=${1:?table or speed}
if [ "$PART" = table ]; then TABLE=${2:-recipe}; LABEL=${3:-h100}; else LABEL=${2:-h100}; fi
case $PART:${TABLE:-} in  # gpu_tables.sh's arguments: part, label, overrides
table:recipe) set -- "$LABEL" ;;
table:random10) set -- "$LABEL-fast" "unlearn.methods=[retrain,rl]" ;;
speed:) ;;
*) echo "unknown part '$*': table [recipe|random10] [LABEL], or speed [LABEL]" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder the results go to (the device sets it)}"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
case $PART in
table)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-lite/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    (timeout 480 python3 -m pytest -q -p no:cacheprovider -m "not slow" -W ignore >"$OUT/tests_cuda.log" 2>&1
     echo "pytest exit $?" >>"$OUT/tests_cuda.log") &
    timeout 540 sh benchmarks/gpu_tables.sh "$TABLE" "$@" >"$OUT/table.log" 2>&1
    echo "table exit $?"
    wait
    grep -E "^(FAILED|ERROR)|passed|failed|pytest exit" "$OUT/tests_cuda.log" | tail -40
    grep -vE "it/s|s/it" "$OUT/table.log" | tail -30
    ;;
speed)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site2:$PWD
    step="python3 benchmarks/sd_training.py --tokenizer .gpu-data/clip_tokenizer --phases salun --batch-sizes 8 --checkpointing off"
    $step --label "$LABEL-eager" --precisions no bf16 --compile off --warmup-steps 2 --measure-steps 5 | grep -v "^flops"
    timeout 300 $step --label "$LABEL-compiled" --precisions bf16 --compile on --warmup-steps 2 --measure-steps 10 | grep -v "^flops"
    cp benchmarks/results/sd_training_"$LABEL"-eager.json benchmarks/results/sd_training_"$LABEL"-compiled.json "$OUT/"
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" -W ignore tests/test_audit.py tests/test_security.py \
        tests/test_card.py tests/test_ringabell.py tests/test_sdxl.py tests/test_docs_commands.py >"$OUT/tests_nudenet.log" 2>&1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests_nudenet.log" | tail -20
    ;;
esac
