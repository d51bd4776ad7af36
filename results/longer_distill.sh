#!/usr/bin/env bash
# Do the KL-guided and uniform hybrids keep their order with 4x the distill tokens? The Stage 1 of
# results/reproduce.sh (transfer, align 300 x 32 x 512), then the kl and uniform 25% hybrids of reproduce.sh (layers as
# it selected them) distilled for 1200 steps x 16 x 1024 = 19.7M tokens, the two side by side on one GPU, then one eval
# of both beside the teacher (the prompts and settings of reproduce.sh's eval).
#
#   bash results/longer_distill.sh DATA_DIR [OUT_DIR]      # ~12 minutes on one H100
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="$1"; OUT_DIR="${2:-out}"; PY="${PYTHON:-python}"
R=(--run_name=long --out_dir="$OUT_DIR"); D="$OUT_DIR/long"
mkdir -p "$D/logs"
t() { local n=$1 t0=$SECONDS; shift; "$@" > "$D/logs/$n.log" 2>&1; local rc=$?
      echo "time $n $((SECONDS - t0))s rc $rc" | tee -a "$D/logs/times.txt"; return $rc; }
t transfer $PY transfer.py "${R[@]}" || exit 1
t align $PY align.py "${R[@]}" --data_dir="$DATA_DIR" --steps=300 --batch_size=32 --seq_len=512 --log_every=25 || exit 1
DIST=(--steps=1200 --batch_size=16 --seq_len=1024 --warmup=20 --save_every=0 --valid_batches=16)
t distill_kl_8 $PY distill.py "${R[@]}" --layers=0,1,2,17,18,20,23,24 --out=distill_kl_8 "${DIST[@]}" &
t distill_uniform_8 $PY distill.py "${R[@]}" --layers=1,5,9,13,16,20,24,28 --out=distill_uniform_8 "${DIST[@]}" &
wait -n && wait -n || { echo "a distill failed: see $D/logs/distill_*.log"; exit 1; }
t eval $PY eval.py "${R[@]}" --data_dir="$DATA_DIR" --models="$D/distill_kl_8/ckpt.pt,$D/distill_uniform_8/ckpt.pt" \
  --lengths=1024,2048,4096 --prompts=20 --batch_size=60 --speed=off
