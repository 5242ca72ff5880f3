#!/usr/bin/env bash
# Recipe round 2: the r2-*.json arms at equal wall clock, scored with one protocol.
#
#   bash training/recipes/round2.sh            # all ten arms, training seed 0
#   bash training/recipes/round2.sh 1 r2-cosine r2-batch32   # finalists again, training seed 1
#   DATASET_NAME=path/to/mnist bash training/recipes/round2.sh   # a local copy of the Hub dataset ylecun/mnist
#
# Run from the repository root with the package installed. Arms train two at a time, one process and one CPU
# thread each, for the 15 minutes of training time their configs give (a step count measured as each run starts,
# over which the learning rate decays, see train.py's --max_train_minutes); then each is scored on 1,000 samples of the release's scheduler (the
# pipeline's DDPM on 50 respaced steps, U-Net in bf16, sampling seed 0) against the 10,000 MNIST test digits.
# Results: runs/round2/seed$SEED/ARM (the run) and ARM.json (`ddpm-mnist evaluate --json`). An arm already scored is
# skipped and one cut short resumes from its last checkpoint, so the script can be run again after a stop.
set -euo pipefail

seed=${1:-0}
if ! [[ $seed =~ ^[0-9]+$ ]]; then
  echo "round2.sh: the first argument is the training seed, a number (got '$seed'): round2.sh [SEED [ARM...]]" >&2
  exit 2
fi
shift || true
arms=("$@")
if [ ${#arms[@]} -eq 0 ]; then
  arms=(r2-cosine r2-constant r2-batch32 r2-batch128 r2-ema-short r2-ema-long r2-minsnr5 r2-dropout r2-width48 r2-fp32)
fi
root=runs/round2/seed$seed
dataset=${DATASET_NAME:-ylecun/mnist}
mkdir -p "$root"

train() {  # ARM: train it on one thread, or resume it, unless its pipeline is saved
  local out=$root/$1
  [ -f "$out/model_index.json" ] && return 0
  local resume=()
  [ -d "$out/checkpoints" ] && resume=(--resume_from_checkpoint latest)
  accelerate launch --cpu --num_processes 1 --num_cpu_threads_per_process 1 training/train.py \
    --config "training/recipes/$1.json" --dataset_name "$dataset" --seed "$seed" --output_dir "$out" \
    ${resume[@]+"${resume[@]}"} >> "$out.log" 2>&1
}

score() {  # ARM SAMPLING_SEED: the release's protocol, one JSON line
  local result=$root/$1.json
  [ "$2" -ne 0 ] && result=$root/$1.sampling-seed$2.json
  [ -f "$result" ] && return 0
  ddpm-mnist evaluate "$root/$1" --scheduler ddpm --num_inference_steps 50 --num_samples 1000 --batch_size 250 \
    --dtype bf16 --seed "$2" --dataset_name "$dataset" --json | tail -n 1 > "$result.part"
  mv "$result.part" "$result"
}

failed=()
for ((i = 0; i < ${#arms[@]}; i += 2)); do  # arms pair up in the order given; both of a pair share the 2 cores
  pair=("${arms[@]:i:2}")
  echo "$(date -u +%H:%M:%S) training ${pair[*]}"
  pids=()
  for arm in "${pair[@]}"; do
    train "$arm" &
    pids+=($!)
  done
  trained=()
  for j in "${!pair[@]}"; do  # both finish training before either is scored
    if wait "${pids[j]}"; then trained+=("${pair[j]}"); else failed+=("${pair[j]}"); fi
  done
  for arm in ${trained[@]+"${trained[@]}"}; do score "$arm" 0; done
done
if [ "$seed" -eq 0 ] && [ -f "$root/r2-cosine/model_index.json" ]; then  # the metric's noise from sampling alone
  score r2-cosine 1
  score r2-cosine 2
fi
echo "$(date -u +%H:%M:%S) done"
if [ ${#failed[@]} -gt 0 ]; then
  echo "round2.sh: training failed for ${failed[*]}; see $root/ARM.log, then run the script again" >&2
  exit 1
fi
