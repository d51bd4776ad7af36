#!/usr/bin/env bash
# Decoding speed and cache memory of the README's hybrid layouts, without training them: speed and memory depend on
# which layers are softmax attention, not on the weights. The hybrids are built from the Stage-0 student (transfer)
# with one distill step (the layers of results/smollm2/selection_kl_8.json and _kl_4.json, and none), then eval.py
# runs the same speed sweep as results/reproduce.sh's eval_speed step. Only the speed rows of its output mean
# anything (the untrained hybrids' perplexity and recall do not).
#
#   bash results/speed_layouts.sh DATA_DIR [OUT_DIR]     # one GPU, ~3 minutes on an H100
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="$1"; O="${2:-out}"; PY="${PYTHON:-python}"
$PY transfer.py --run_name=layouts --out_dir="$O"
for spec in kl_8:0,1,2,17,18,20,23,24 kl_4:1,18,20,23 linear:none; do
  $PY distill.py --run_name=layouts --out_dir="$O" --input="$O/layouts/transfer/ckpt.pt" --data_dir="$DATA_DIR" \
    --layers="${spec#*:}" --out="distill_${spec%%:*}" --steps=1 --batch_size=1 --seq_len=64 --valid_batches=1 --save_every=0
done
$PY eval.py --run_name=layouts_speed --out_dir="$O" --data_dir="$DATA_DIR" --ppl_windows=8 --tasks=mqar --lengths=1024 --prompts=2 \
  --models="$O/layouts/distill_kl_8/ckpt.pt,$O/layouts/distill_kl_4/ckpt.pt,$O/layouts/distill_linear/ckpt.pt" \
  --speed=on --speed_lengths=1024,4096,16384,32768
