#!/bin/sh
# The three CIFAR-10 forgetting settings with the fast recipe, on one GPU: every method of the
# table, and for random 10% a SalUn sweep: lr (the reference tunes each method's lr by grid;
# 0.013 is its README's SalUn command, 0.1 that of the README's early version)
# crossed with the mask mode (hard, or the reference's earlier gradient-only mask), and RL's lr,
# so that SalUn is compared with a tuned baseline. Each method runs once per setting of its own
# (6 SalUn runs, 2 RL runs), and the runs at the config's settings are the table's. Random 50%
# and class-wise sweep the same lrs (hard mask only) after both their tables are done.
# Random 50% and class-wise reuse the random-10% original model (original_from), as the
# reference trains it once. Each table is one benchmarks/classification.py run writing its
# JSON and Markdown into $OUT (default benchmarks/results); finished stages under $RUNS
# (default runs/classification) are reused when a run is repeated on the same machine.
#   sh benchmarks/gpu_tables.sh [random10|others|all|recipe|trials] [LABEL] [key=value ...]   (default: all h100-fast)
# `recipe` trains only original models: the reference recipe and a fast variant, for the TA question.
# `trials`: the random-10% table (Retrain, RL, SalUn) in three trials (retrain.seed and unlearn.seed
# + 0, 1, 2; trial 0 is the table's own runs), for the seed noise of each gap (~8 min on one H100).
# The overrides go to every table (the tests run the script on a tiny dataset this way).
# One H100, measured: original ~106 s, Retrain ~96 s (random 10%); each half of `all` is
# meant for one 600 s device call. CIFAR-10 comes from .gpu-data/ (gpu_wheels.sh cifar10).
set -e
cd "$(dirname "$0")/.."
PART=${1:-all}
LABEL=${2:-h100-fast}
if [ $# -gt 2 ]; then shift 2; else set --; fi
DATA=${CIFAR10:-.gpu-data/cifar10/cifar10_full_jpeg_q75.npz}
RUNS=${RUNS:-runs/classification}
run() {  # run CONFIG LABEL WORKDIR [args...]: one benchmarks/classification.py table
    config=$1; label=$2; workdir=$3; shift 3
    ${PYTHON:-python3} benchmarks/classification.py --config "configs/classification/$config.yaml" --data-path "$DATA" \
        --label "$label" --out "${OUT:-benchmarks/results}" "$@" "workdir=$workdir"
}
table() {  # table SETTING [args...]: the fast-recipe table of a forgetting setting
    setting=$1; shift
    run "cifar10_${setting}_fast" "$LABEL" "$RUNS/cifar10_${setting}_fast" "$@"
}
case $PART in random10|others|all|recipe|trials) ;; *) echo "unknown part '$PART': random10, others, all, recipe or trials" >&2; exit 2 ;; esac
if [ "$PART" = trials ]; then
    table random10 --trials 3 "unlearn.methods=[retrain,rl,salun]" "$@"
    exit 0
fi
if [ "$PART" = recipe ]; then
    # Is 94% reachable on the JPEG copy? The original model alone, with the reference recipe
    # (182 epochs, batch 256; ~5 min on an H100 in bf16, hence mixed_precision=auto: the question is the
    # data, not the precision) and with the fast recipe at batch 256.
    run cifar10_random10 "$LABEL-original-reference" "$RUNS/recipe-reference" "unlearn.methods=[]" mixed_precision=auto "$@"
    run cifar10_random10_fast "$LABEL-original-fast-b256" "$RUNS/recipe-fast-b256" "unlearn.methods=[]" \
        train.batch_size=256 train.lr=0.2 "$@"
    exit 0
fi
if [ "$PART" != others ]; then
    table random10 --sweep unlearn.salun.lr=0.013,0.03,0.1 --sweep unlearn.salun.mask_mode=hard,gradient --sweep unlearn.rl.lr=0.01,0.03 "$@"
fi
if [ "$PART" != random10 ]; then
    # Both tables first, then each one's sweep of SalUn's and RL's lr (its finished stages are
    # reused), so a time limit that stops a sweep still leaves both tables.
    for setting in random50 class; do
        table $setting "$@" "original_from=$RUNS/cifar10_random10_fast"
    done
    for setting in random50 class; do
        table $setting --sweep unlearn.salun.lr=0.013,0.03,0.1 --sweep unlearn.rl.lr=0.01,0.03 "$@" "original_from=$RUNS/cifar10_random10_fast"
    done
fi
