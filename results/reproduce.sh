#!/usr/bin/env bash
# The result of the README (issue: KL-guided selection against uniform and GA-S1 on SmolLM2-135M, one GPU).
#
# One Stage-1 checkpoint, every layer scored, then for budgets 8 and 4 of 30 softmax layers a hybrid per selection
# method (kl, uniform, ga_s1), each distilled with the same data, seed, steps and settings, plus the all-linear
# student; then one eval of all of them beside the teacher. Finetune (Stage 3) is left out: it would be the same
# for every method, and the comparison is about the selection.
#
#   bash results/reproduce.sh DATA_DIR [OUT_DIR]     # DATA_DIR: token files of data.py (../shared/corpus here)
#
# Sizes are environment variables: ALIGN_STEPS, SCORE_STEPS, DISTILL_STEPS, EVAL_N.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="$1"; OUT_DIR="${2:-out}"; RUN="${RUN:-result}"; PY="${PYTHON:-python}"
ALIGN_STEPS="${ALIGN_STEPS:-300}"; SCORE_STEPS="${SCORE_STEPS:-60}"; DISTILL_STEPS="${DISTILL_STEPS:-300}"
R=(--run_name="$RUN" --out_dir="$OUT_DIR")
D="$OUT_DIR/$RUN"
mkdir -p "$D/logs"
# t NAME CMD...: run one step, keep its whole output in logs/NAME.log, show the step lines, time it.
t() { local name=$1 t0=$SECONDS; shift; echo "======== $name: $*"
      "$@" > "$D/logs/$name.log" 2>&1; local rc=$?
      grep -E "^(step|final|probes|scoring|selected|layers|Traceback)|Error" "$D/logs/$name.log" | tail -n 12
      echo "time $name $((SECONDS - t0))s rc $rc" | tee -a "$D/logs/times.txt"; return $rc; }

t transfer $PY transfer.py "${R[@]}" || exit 1
t align $PY align.py "${R[@]}" --data_dir="$DATA_DIR" --steps="$ALIGN_STEPS" --batch_size=32 --seq_len=512 --log_every=25 || exit 1
t score $PY score.py "${R[@]}" --steps="$SCORE_STEPS" --eval_every=10 --patience=3 --batch_size=8 --seq_len=1024 --warmup=10 || exit 1
DIST=(--steps="$DISTILL_STEPS" --batch_size=16 --seq_len=1024 --warmup=20 --save_every=0 --valid_batches=16)
hybrid() {  # hybrid METHOD K: select K layers by METHOD, distill that hybrid
  t "select_$1_$2" $PY select_layers.py "${R[@]}" --method="$1" --budget="$2" --out="selection_$1_$2.json" &&
  t "distill_$1_$2" $PY distill.py "${R[@]}" --selection="$D/select/selection_$1_$2.json" --out="distill_$1_$2" "${DIST[@]}"
}
for k in 8 4; do for method in kl uniform ga_s1; do hybrid "$method" "$k"; done; done
t distill_linear $PY distill.py "${R[@]}" --layers=none --out=distill_linear "${DIST[@]}"
# Quality and recall of every hybrid, the all-linear students (Stage 1 alone, and after distill) and the teacher.
MODELS="$D/align/ckpt.pt"
for m in kl_8 uniform_8 ga_s1_8 kl_4 uniform_4 ga_s1_4 linear; do MODELS="$MODELS,$D/distill_$m/ckpt.pt"; done
t eval $PY eval.py "${R[@]}" --data_dir="$DATA_DIR" --models="$MODELS" --lengths=1024,2048,4096 --prompts="${EVAL_N:-20}" \
  --batch_size=60 --speed=off
# Speed and memory depend on the layout only (K softmax layers), so they are measured once per budget.
t eval_speed $PY eval.py --run_name="${RUN}_speed" --out_dir="$OUT_DIR" --data_dir="$DATA_DIR" --ppl_windows=8 \
  --models="$D/distill_kl_8/ckpt.pt,$D/distill_kl_4/ckpt.pt,$D/distill_linear/ckpt.pt" --tasks=mqar --lengths=1024 --prompts=2 \
  --speed=on --speed_lengths=1024,4096,16384,32768
cat "$D/logs/times.txt"
