#!/usr/bin/env bash
# Rebuilds sample_models/ from real Fashion-MNIST with `flain train` (about 25 minutes on 2 cores).
# The architecture is cnn-mnist (2 conv + 2 fc, the paper's MNIST/EMNIST model), whose checkpoints
# are 1.7 MB, so two samples with init, final, aux and a test subset stay far under 25 MB; the
# paper's cnn-fmnist would need 9.7 MB per checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAIN=".venv/bin/flain --threads 1"   # one thread: bit-reproducible on one machine, as recorded
OUT=${1:-sample_models}
COMMON="--dataset fmnist --arch cnn-mnist --clients 10 --mcr 0.4 --pdr 0.3 --attack 0:5 --rounds 20 --seed 1"

$FLAIN train $COMMON --trigger cba --split iid --out "$OUT/fmnist-cba-iid" --log "$OUT/fmnist-cba-iid/train.jsonl" --force
$FLAIN train $COMMON --trigger dba --split dirichlet --alpha 0.5 --out "$OUT/fmnist-dba-noniid" \
       --log "$OUT/fmnist-dba-noniid/train.jsonl" --force
for s in fmnist-cba-iid fmnist-dba-noniid; do
  $FLAIN aux export --dataset fmnist --per-class 20 --seed 0 --out "$OUT/$s/aux" --force
done
# 2,000 test images (200 per class), disjoint from the aux images, for machines without the dataset
$FLAIN aux export --dataset fmnist --per-class 200 --seed 1 --format npz --exclude "$OUT/fmnist-cba-iid/aux" \
       --out "$OUT/fmnist-test-2000.npz" --force
