#!/usr/bin/env bash
# Issue #5's reproduction on the CLI, timed: FiMODA's finding (Grad-Dot high after little further
# training and decaying, CG influence rising) on the bundled `adult` data, MLP in->128->128->2, SGD.
#
# Small setting chosen to finish in under 15 minutes on 2 cores (docs/gold.md, "Reproducing"):
# 4,000 training points, |I| = 50 random points, 50 test targets, 20 paired seeds, 10 epochs of
# further training (mask removal, float64), every registered method compared.
#
# Usage: benchmarks/reproduce_gold.sh [OUT_DIR]   (default runs/repro-adult; a killed run resumes)
set -euo pipefail
OUT=${1:-runs/repro-adult}
GGDA=${GGDA:-.venv/bin/ggda}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
start=$SECONDS
stamp() { echo "[$((SECONDS - start)) s] $*"; }

stamp "train final model"
[ -f "$OUT/run.json" ] || $GGDA train --data adult --model mlp-m --max-train 4000 --epochs 30 --lr 0.01 \
    --momentum 0.9 --batch-size 128 --out "$OUT"
stamp "gold standard: further training with and without each unit"
$GGDA gold --run "$OUT" --units points --n-units 50 --targets 50 --epochs 10 --seeds 20 \
    --optimizer sgd --lr 2e-3 --batch-size 128 --removal mask --workers 2 --out "$OUT/gold"
stamp "compare every method with the gold standard"
$GGDA compare --run "$OUT" --gold "$OUT/gold" --methods all \
    --opt if-cg:hessian=gn --opt if-cg:damping_scale=100 --opt if-cg:max_iter=100
stamp "done: $OUT/gold/compare/compare.csv and compare.png"
