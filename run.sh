#!/usr/bin/env bash
# The main job: the whole pipeline, stage after stage, on one machine.
#
#   data -> transfer (Stage 0) -> align (Stage 1) -> score (KL-guided layer scores) -> select_layers (top-K)
#        -> distill (Stage 2) -> finetune (Stage 3) -> eval (the run's hybrids beside the teacher)
#
# Each stage's default input is the previous stage's output under out/<run>/, so the stages need no paths here.
# With a GPU it runs the "gpu" preset; without one a "cpu" preset that finishes in minutes (few steps, short
# sequences, every layer still scored but for a handful of steps): a smoke run of the plumbing, not a result.
#
#   bash run.sh                                                   # SmolLM2-135M-Instruct, data auto, budget 0.25
#   bash run.sh --teacher=Qwen/Qwen2.5-0.5B-Instruct --data=path/to/texts --budget=0.25 --run=qwen
#   bash run.sh --gpus=2                                          # align, score, distill, finetune under torchrun
#
# Arguments (or the environment variables of the same name in capitals):
#   --teacher=   HF folder | hub id | .gguf | "" (default: SmolLM2-135M-Instruct)
#   --data=      auto | teacher | a file or folder of text | a hub dataset id (default auto, see data.py)
#   --budget=    softmax layers kept: a fraction of L (0.25) or a count (8)
#   --run=       run name: everything goes to <out_dir>/<run>/ (default smollm2)
#   --out_dir=   root of the runs (default out)
#   --preset=    auto | gpu | cpu (default auto: gpu when torch sees one)
#   --baseline=  none | uniform: also distill and finetune a uniform-interleaved hybrid to compare (default none)
#   --mixer=     gla | gdn: the linear mixer of the student (default gla; transfer.py --mixer)
#   --gpus=      processes per training stage: 1 = python, N > 1 = torchrun --standalone --nproc_per_node=N
#
# A rerun continues: every training stage runs with --resume=true, so a finished stage says so and is skipped, an
# interrupted one continues from its last mid-run checkpoint (the presets save every few minutes), and score.py
# skips the layers it has finished. Flags that change a stage's result make it refuse to continue; remove
# out/<run>/<stage> (or pass --resume=false in its *_ARGS) to redo it.
# Extra flags for one stage: DATA_ARGS, ALIGN_ARGS, SCORE_ARGS, DISTILL_ARGS, FINETUNE_ARGS, EVAL_ARGS
# (e.g. DISTILL_ARGS="--steps=4000 --untie=true" bash run.sh); they come last, so they override the preset.
set -euo pipefail
cd "$(dirname "$0")"

TEACHER="${TEACHER:-}"
DATA="${DATA:-auto}"
BUDGET="${BUDGET:-0.25}"
RUN="${RUN:-smollm2}"
OUT_DIR="${OUT_DIR:-out}"
PRESET="${PRESET:-auto}"
BASELINE="${BASELINE:-none}"
GPUS="${GPUS:-1}"
MIXER="${MIXER:-gla}"
PYTHON="${PYTHON:-python}"
for arg in "$@"; do
  case "$arg" in
    --teacher=*) TEACHER="${arg#*=}" ;;
    --data=*) DATA="${arg#*=}" ;;
    --budget=*) BUDGET="${arg#*=}" ;;
    --run=*) RUN="${arg#*=}" ;;
    --out_dir=*) OUT_DIR="${arg#*=}" ;;
    --preset=*) PRESET="${arg#*=}" ;;
    --baseline=*) BASELINE="${arg#*=}" ;;
    --gpus=*) GPUS="${arg#*=}" ;;
    --mixer=*) MIXER="${arg#*=}" ;;
    *) echo "run.sh: unknown argument '$arg' (valid: --teacher= --data= --budget= --run= --out_dir= --preset= --baseline= --gpus= --mixer=)" >&2
       exit 2 ;;
  esac
done
if [ "$PRESET" = auto ]; then
  PRESET=$("$PYTHON" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi

# ---- presets: sizes per stage (steps, batch, sequence length); everything else is each stage's default
case "$PRESET" in
  gpu)
    # SmolLM2-135M on one H100: 12 minutes (715 s; the README lists each stage's measured time). The
    # sizes of results/reproduce.sh; the paper runs 4096-token sequences and ~600M tokens per stage: scale the
    # steps up (or use *_ARGS) for a stronger hybrid.
    DATA_P="--max_tokens=40000000"
    ALIGN_P="--steps=300 --batch_size=32 --seq_len=512 --save_every=100"
    SCORE_P="--steps=60 --eval_every=10 --patience=3 --batch_size=8 --seq_len=1024"
    DISTILL_P="--steps=300 --batch_size=16 --seq_len=1024 --save_every=100 --valid_batches=16"
    FINETUNE_P="--steps=300 --batch_size=8 --kl_weight=0.5 --save_every=100"
    EVAL_P="--batch_size=32"
    ;;
  cpu)
    echo "=================================================================================================="
    echo " No GPU: running the small CPU preset (a few steps per stage, 64-token sequences, every layer scored"
    echo " for 1 step). It checks that the pipeline runs end to end; its numbers mean nothing."
    echo "=================================================================================================="
    DATA_P="--max_tokens=400000 --valid_tokens=40000"
    ALIGN_P="--steps=4 --batch_size=2 --seq_len=64 --log_every=1 --valid_batches=1"
    SCORE_P="--steps=1 --eval_every=1 --patience=0 --batch_size=2 --seq_len=64"
    DISTILL_P="--steps=6 --batch_size=2 --seq_len=64 --valid_batches=2 --save_every=0 --log_every=1"
    FINETUNE_P="--steps=4 --batch_size=2 --kl_weight=0.5 --valid_batches=2 --save_every=0 --log_every=1"
    EVAL_P="--lengths=512 --prompts=2 --ppl_seq_len=64 --ppl_windows=4 --batch_size=2"
    ;;
  *) echo "run.sh: --preset must be auto, gpu or cpu (got '$PRESET')" >&2; exit 2 ;;
esac
case "$BASELINE" in none|uniform) ;; *) echo "run.sh: --baseline must be none or uniform" >&2; exit 2 ;; esac
case "$GPUS" in ''|*[!0-9]*|0) echo "run.sh: --gpus must be a positive integer (got '$GPUS')" >&2; exit 2 ;; esac
if [ "$GPUS" -gt 1 ]; then
  TRAIN=(torchrun --standalone --nproc_per_node="$GPUS")   # align, score, distill, finetune
else
  TRAIN=("$PYTHON")
fi

RUN_DIR="$OUT_DIR/$RUN"
LOGS="$RUN_DIR/logs"
mkdir -p "$LOGS"
echo "run.sh | run $RUN | teacher ${TEACHER:-(default SmolLM2-135M-Instruct)} | data $DATA | budget $BUDGET | preset $PRESET | baseline $BASELINE | gpus $GPUS | mixer $MIXER"
echo "run.sh | logs: $LOGS/<stage>.log"

TIMES=()
stage() {   # stage NAME LAUNCHER SCRIPT ARGS...: run one stage, its output shown and kept in $LOGS/NAME.log, timed
  local name="$1" launcher="$2" script="$3" t0=$SECONDS
  shift 3
  local cmd=("$PYTHON")
  [ "$launcher" = train ] && cmd=("${TRAIN[@]}")
  echo; echo "======== $name: ${cmd[*]} $script $*"
  if ! "${cmd[@]}" "$script" "$@" 2>&1 | tee "$LOGS/$name.log"; then
    echo "run.sh: stage '$name' failed ($script); its log: $LOGS/$name.log" >&2
    echo "run.sh: fix the cause and run the same command again: finished stages are skipped" >&2
    exit 1
  fi
  TIMES+=("$(printf '%-18s %6ds' "$name" $((SECONDS - t0)))")
}
common=(--run_name="$RUN" --out_dir="$OUT_DIR")
# shellcheck disable=SC2086  # the preset and *_ARGS strings are lists of flags, split on purpose
{
stage data one data.py "${common[@]}" --data="$DATA" --teacher="$TEACHER" $DATA_P ${DATA_ARGS:-}
stage transfer one transfer.py "${common[@]}" --teacher="$TEACHER" --mixer="$MIXER"
stage align train align.py "${common[@]}" --resume=true $ALIGN_P ${ALIGN_ARGS:-}
stage score train score.py "${common[@]}" --budget="$BUDGET" $SCORE_P ${SCORE_ARGS:-}
stage select one select_layers.py "${common[@]}" --method=kl --budget="$BUDGET"
stage distill train distill.py "${common[@]}" --resume=true $DISTILL_P ${DISTILL_ARGS:-}
stage finetune train finetune.py "${common[@]}" --resume=true $FINETUNE_P ${FINETUNE_ARGS:-}
if [ "$BASELINE" = uniform ]; then
  stage select_uniform one select_layers.py "${common[@]}" --method=uniform --budget="$BUDGET" --out=selection_uniform.json
  stage distill_uniform train distill.py "${common[@]}" --selection="$RUN_DIR/select/selection_uniform.json" \
    --out=distill_uniform --resume=true $DISTILL_P ${DISTILL_ARGS:-}
  stage finetune_uniform train finetune.py "${common[@]}" --input="$RUN_DIR/distill_uniform/ckpt.pt" \
    --out=finetune_uniform --resume=true $FINETUNE_P ${FINETUNE_ARGS:-}
fi
stage eval one eval.py "${common[@]}" $EVAL_P ${EVAL_ARGS:-}
}

echo
echo "======== time per stage ($PRESET preset)"
printf '  %s\n' "${TIMES[@]}"
echo "  total              $(printf '%6d' "$SECONDS")s"
echo "results: $RUN_DIR/eval/eval.json (the table above), plots: $RUN_DIR/eval/*.png, scores: $RUN_DIR/score/scores.json,"
echo "         selection: $RUN_DIR/select/selection.json, hybrid: $RUN_DIR/finetune/ckpt.pt"
echo "export the hybrid to a Hugging Face folder: python export.py --run_name=$RUN --out_dir=$OUT_DIR"
