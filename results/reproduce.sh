#!/usr/bin/env bash
# The study at scale: KL-guided layer selection against uniform interleaving and GA-S1, for GLA and GDN students, at
# 12.5%, 25% and 50% softmax layers of the teacher (SmolLM2-135M-Instruct by default), with the all-linear student
# and the teacher as bounds, at the paper's 4096-token sequences and >= 50M tokens per 25% hybrid.
#
# It takes hours of GPU time, more than one lease of a machine, so it runs in parts. A part starts from the teacher
# and redoes what it needs (data, Stage 0 and Stage 1 with the same seed and tokens: the same student, up to the
# GPU's unordered sums), then leaves its small files under results/study/<part>/ (scores, selections, eval.json, the
# stages' logs, its times, gpu.csv), which are committed. Checkpoints stay on the machine, one Stage 1 per student
# and GPU (out/study_<student>; out/gpu<i>/study_<student> for GPU i > 0 under `next`): a later part of the same
# student on the same GPU starts from it, and `next` prefers such parts. `status` says which parts are done; `next`
# runs the others. A part cut short (a lease ran out) resumes where it stopped: run again, it keeps the hybrids it
# had finished (their files under results/study/<part>/, each with the recipe.txt that made it: a run with other
# sizes is refused) and counts the time it spent before; a part done refuses to run again until its folder is
# removed.
#
#   bash results/reproduce.sh status          # every part, done or not, and its time (measured, or the estimate)
#   bash results/reproduce.sh next [N]        # the next N parts not done yet, at once, one GPU each (N = GPUs), GPU
#                                             # i > 0 in OUT_DIR/gpu<i> (one Stage 1 per GPU and student)
#   bash results/reproduce.sh part NAME       # one part by name (see `status`)
#   python results/report.py                  # the table, retention, curves and score plots from results/study/
#
# Parts (each fits one lease of a GPU), in the order `next` takes them (but a part whose student's Stage 1 is on the
# machine first): score_<student> (Stage 1, every layer scored); for method kl (needs score_<student>), uniform and
# ga_s1: <student>_<method>_25 (Stage 1 again, the 25% hybrid with DISTILL_TOKENS and snapshots at 5M and 20M tokens
# for the curve of recall against tokens); <student>_linear (Stage 1 again, the all-linear bound with
# DISTILL_TOKENS); <student>_<method>_small (Stage 1 again, the 12.5% and 50% hybrids with SMALL_TOKENS). Every
# hybrid is finetuned and evaluated beside the teacher. Same seed, data and steps for every method. Last,
# gdn_kl_seqlen: is 4096 the length to distill at? The GDN kl 25% hybrid distilled at each of SEQLENS (the same tokens
# per step, so the same steps and data) up to the curve's last snapshot, evaluated as the curve is (not finetuned),
# beside gdn_kl_25's snapshot at 4096.
#
# Sizes (environment): ALIGN_TOKENS, DISTILL_TOKENS, SMALL_TOKENS, FINETUNE_TOKENS, SEQ_LEN, BATCH, PROMPTS (recall
# prompts per task and length: 100 keeps a cell's standard error under 0.05), RULER=1 (lm-eval's offline RULER too,
# in each hybrid's final eval: about 2 more GPU-minutes per length at 100 documents, which the leases of one GPU did
# not leave, so it is off by default), TEACHER, DATA_SRC (data.py --data), PRESET=cpu (a tiny run of every command
# on the CPU with a small TEACHER: a check of the plumbing, tests/test_study.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
RES="${RES:-results/study}"; OUT_DIR="${OUT_DIR:-out}"; TEACHER="${TEACHER:-}"
STUDENTS=(gla gdn); METHODS=(kl uniform ga_s1)
if [ "${PRESET:-gpu}" = cpu ]; then
  ALIGN_TOKENS=${ALIGN_TOKENS:-512}; DISTILL_TOKENS=${DISTILL_TOKENS:-512}; SMALL_TOKENS=${SMALL_TOKENS:-256}
  FINETUNE_TOKENS=${FINETUNE_TOKENS:-256}; SEQ_LEN=${SEQ_LEN:-64}; BATCH=${BATCH:-2}; PROMPTS=${PROMPTS:-1}
  SNAPSHOTS="128,256"; SEQLENS="128 32"; SCORE=(--steps=2 --eval_every=1 --patience=0 --batch_size=2 --seq_len=64)
  EVAL=(--lengths=1024 --tasks=niah_single --ppl_seq_len=64 --ppl_windows=2 --batch_size=2 --device=cpu)
  DATA=(--max_tokens=400000 --valid_tokens=40000)
else
  ALIGN_TOKENS=${ALIGN_TOKENS:-50000000}; DISTILL_TOKENS=${DISTILL_TOKENS:-50000000}
  SMALL_TOKENS=${SMALL_TOKENS:-12500000}; FINETUNE_TOKENS=${FINETUNE_TOKENS:-5000000}; SEQ_LEN=${SEQ_LEN:-4096}
  BATCH=${BATCH:-8}; PROMPTS=${PROMPTS:-100}; SNAPSHOTS="5000000,20000000"; SEQLENS="8192 2048"
  SCORE=(--steps=300 --eval_every=10 --patience=3 --batch_size=8 --seq_len=1024)   # the early stop ends them
  EVAL=(--lengths=1024,2048,4096 --batch_size=32 --speed=off)
  DATA=(--max_tokens=100000000)
fi
[ "$FINETUNE_TOKENS" -gt 0 ] 2> /dev/null ||
  { echo "FINETUNE_TOKENS=$FINETUNE_TOKENS: give a count of tokens above 0 (every hybrid but gdn_kl_seqlen's is" \
      "finetuned)" >&2; exit 2; }
steps() { echo $(( ($1 + BATCH * SEQ_LEN - 1) / (BATCH * SEQ_LEN) )); }   # steps that hold at least $1 tokens
shape() { echo "--batch_size=$BATCH --seq_len=$SEQ_LEN"; }   # the training shape, from BATCH and SEQ_LEN as set
RULER_TASKS="niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe"
RULER_ARGS=()   # the final evals', not the curve's
[ "${RULER:-0}" = 1 ] && RULER_ARGS=(--lm_eval="$RULER_TASKS" --lm_eval_limit="$PROMPTS")
# GPU minutes of each part on one H200, the larger student's where they differ, from the stages measured: data and
# transfer ~30 s; Stage 1 198 s (GLA on its sub-chunk kernel, session 13) or 232 s (GDN); scoring 365-420 s (sessions
# 9 and 11); a 25% distill of 50M tokens 320-357 s (GDN, sessions 11 and 12; GLA 337 s, session 13), the all-linear
# one 310 s (GLA, session 13), one of 12.5M ~93 s (GLA, session 13), finetune 56-93 s, eval 72-87 s and the curve's
# 46-55 s; session 12's gdn_uniform_25 took 833 s in all, session 13's gla_ga_s1_25 789 s, session 14's GLA small
# parts 503-524 s each from a Stage 1 on their machine (gla_kl_small's second half 548 s with its own Stage 1),
# session 15's GDN ones 879 s with their own Stage 1 (244 s; gdn_kl_small) and 555 s from one (gdn_ga_s1_small);
# session 16's gdn_linear 848 s with its own Stage 1 (250 s) and gdn_kl_seqlen 514 s from one (distills of 20M
# tokens 198 s at 8192 and 170 s at 2048, the curve's eval 49-50 s each), so ~13 minutes with its own
declare -A ESTIMATE_MIN=([score]=11 [25]=15 [linear]=13 [small]=15 [seqlen]=13)
# of the parts with two hybrids, each hybrid's share (select, distill, finetune, eval): what a cut part has left
declare -A HYBRID_MIN=([small]=5 [seqlen]=4)

parts() {
  for s in "${STUDENTS[@]}"; do echo "score_$s"; done
  for s in "${STUDENTS[@]}"; do for m in "${METHODS[@]}"; do echo "${s}_${m}_25"; done; done
  for s in "${STUDENTS[@]}"; do echo "${s}_linear"; done
  for s in "${STUDENTS[@]}"; do for m in "${METHODS[@]}"; do echo "${s}_${m}_small"; done; done
  echo gdn_kl_seqlen   # one student, the paper's
}
done_part() { [ -f "$RES/$1/done" ]; }
finished() {  # the hybrids of part $1 that are complete (hybrid writes their recipe.txt last), on one line
  local f; for f in "$RES/$1"/*/recipe.txt; do [ -f "$f" ] && basename "$(dirname "$f")"; done | paste -sd ' '
}
known() { case " $(parts | tr '\n' ' ') " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
student_of() { case $1 in score_*) echo "${1#score_}" ;; *) echo "${1%%_*}" ;; esac; }

# st NAME CMD...: one stage of a part, its whole output in $RES/$PART/logs/NAME.log, its time in times.txt
st() {
  local name=$1 t0=$SECONDS; shift
  mkdir -p "$RES/$PART/logs"
  echo "$(date +%T) $PART: $name: $*"
  "$@" > "$RES/$PART/logs/$name.log" 2>&1; local rc=$?
  echo "$name $((SECONDS - t0))s rc=$rc" >> "$RES/$PART/times.txt"
  [ $rc = 0 ] || { echo "$PART: $name failed (rc $rc): $RES/$PART/logs/$name.log" >&2; tail -n 5 "$RES/$PART/logs/$name.log" >&2; }
  return $rc
}

stage1() {  # data, Stage 0 and Stage 1 of student $1 in run $RUN (each skipped where a part before made it)
  st data $PY data.py --run_name="$RUN" --out_dir="$OUT_DIR" --teacher="$TEACHER" --data="${DATA_SRC:-auto}" "${DATA[@]}" &&
  { [ -f "$OUT_DIR/$RUN/transfer/ckpt.pt" ] ||   # written atomically: there = complete
    st transfer $PY transfer.py --run_name="$RUN" --out_dir="$OUT_DIR" --teacher="$TEACHER" --mixer="$1"; } &&
  st align $PY align.py --run_name="$RUN" --out_dir="$OUT_DIR" --resume=true --steps="$(steps "$ALIGN_TOKENS")" \
    $(shape) --save_every=200
}

recipe() {  # recipe NAME TOKENS SNAPSHOTS: what makes a hybrid, but the machine's paths (one line, in recipe.txt)
  echo "hybrid=$1 teacher=${TEACHER:-default} data=${DATA[*]} align=$(steps "$ALIGN_TOKENS") distill=$(steps "$2")" \
    "snapshots=$3 finetune=$(steps "$FINETUNE_TOKENS") shape=$(shape) eval=--prompts=$PROMPTS ${EVAL[*]}" \
    "ruler=${RULER:-0}"
}

hybrid() {  # hybrid NAME SELECT_ARGS TOKENS [SNAPSHOTS]: select, distill, finetune, eval one hybrid of run $RUN
  local name=$1 sel=$2 tokens=$3 snaps=${4:-} d="$OUT_DIR/$RUN" layers keep="$RES/$PART/$1" recipe
  recipe=$(recipe "$name" "$tokens" "$snaps")
  # a hybrid an interrupted run of this part finished (its recipe.txt, written after its other files) is kept, not
  # trained again, if the same recipe made it
  if [ -f "$keep/recipe.txt" ]; then
    if [ "$(cat "$keep/recipe.txt")" != "$recipe" ]; then
      echo "$PART: the $name in $keep was made by another recipe ($keep/recipe.txt), not by this run's:" \
        "$recipe. Run with the sizes it was made with (the environment), or remove $keep to train it again" >&2
      return 2
    fi
    echo "$(date +%T) $PART: $name: kept from an earlier run ($keep)"; return 0
  fi
  if [ "$sel" = none ]; then    # the all-linear student: no softmax layer to select
    layers=(--layers=none)
  else
    # shellcheck disable=SC2086  # sel is a list of flags
    st "select_$name" $PY select_layers.py --run_name="$RUN" --out_dir="$OUT_DIR" $sel --out="selection_$name.json" ||
      return 1
    layers=(--selection="$d/select/selection_$name.json")
  fi
  st "distill_$name" $PY distill.py --run_name="$RUN" --out_dir="$OUT_DIR" "${layers[@]}" --out="distill_$name" \
    --resume=true --steps="$(steps "$tokens")" $(shape) --save_every=200 --valid_batches=16 --snapshots="$snaps" ||
    return 1
  local final="$d/distill_$name/ckpt.pt"   # FINETUNE_TOKENS=0: the distilled model is evaluated
  if [ "$FINETUNE_TOKENS" != 0 ]; then
    final="$d/finetune_$name/ckpt.pt"
    st "finetune_$name" $PY finetune.py --run_name="$RUN" --out_dir="$OUT_DIR" --input="$d/distill_$name/ckpt.pt" \
      --out="finetune_$name" --resume=true --steps="$(steps "$FINETUNE_TOKENS")" $(shape) --kl_weight=0.5 \
      --save_every=200 --valid_batches=16 || return 1
  fi
  st "eval_$name" $PY eval.py --run_name="$RUN" --out_dir="$OUT_DIR" --models="$final" \
    --prompts="$PROMPTS" "${EVAL[@]}" "${RULER_ARGS[@]}" || return 1
  mkdir -p "$keep" && cp "$d/eval/eval.json" "$keep/" || return 1
  if [ -n "$snaps" ]; then   # the curve: the snapshots and the whole distill, with a quarter of the prompts
    local models="" n
    for n in ${snaps//,/ }; do models="$models$d/distill_$name/tokens_$n/ckpt.pt,"; done
    st "eval_curve_$name" $PY eval.py --run_name="${RUN}_curve" --out_dir="$OUT_DIR" --data_dir="$d/data" \
      --models="$models$d/distill_$name/ckpt.pt" --prompts="$(( (PROMPTS + 3) / 4 ))" "${EVAL[@]}" &&
    cp "$OUT_DIR/${RUN}_curve/eval/eval.json" "$keep/eval_curve.json" || return 1
  fi
  { [ "$sel" = none ] || cp "$d/select/selection_$name.json" "$keep/"; } &&
  echo "$recipe" > "$keep/recipe.txt"   # last: a hybrid with its recipe.txt is complete
}

part() {  # checks, the student's lock, the GPU log, the stages, then `done`
  PART=$1; local t0=$SECONDS student method="" size="" rest pid="" rc gpu
  known "$1" || { echo "unknown part '$1': $(parts | tr '\n' ' ')" >&2; return 2; }
  student=$(student_of "$1"); RUN="study_$student"
  if [ "${1#score_}" = "$1" ]; then rest=${1#*_}; method=${rest%_*}; size=${rest##*_}; fi
  if [ "$method" = kl ] && ! done_part "score_$student"; then
    echo "$1 needs the scores of part score_$student: run that part first" >&2; return 2
  fi
  # Parts of one student share its run folder (Stage 1, eval/, the curve's run): one at a time, held until this
  # process ends
  mkdir -p "$OUT_DIR"; exec {lock}> "$OUT_DIR/$RUN.lock"
  if command -v flock > /dev/null && ! flock -n "$lock"; then
    echo "$1: another part of $student is running (it holds $OUT_DIR/$RUN.lock); run a part of the other" \
      "student" >&2
    return 3
  fi
  if done_part "$1"; then echo "$1 is done ($RES/$1/done): remove $RES/$1 to run it again" >&2; return 2; fi
  # an interrupted run of this part left its times (and maybe finished hybrids, kept): they count in its GPU time
  local earlier=0
  if [ -f "$RES/$PART/times.txt" ]; then
    earlier=$(awk '{s += $2} END {print s + 0}' "$RES/$PART/times.txt")
    echo "-- resumed after ${earlier}s of an earlier run" >> "$RES/$PART/times.txt"
  fi
  mkdir -p "$RES/$PART"
  if command -v nvidia-smi > /dev/null; then   # the GPU's clocks, power and use every 15 s: a part that ran slower
    # than another says whether its GPU did; appended, so that a part resumed keeps its earlier runs' lines
    nvidia-smi -i "${CUDA_VISIBLE_DEVICES:-0}" --format=csv -l 15 \
      --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,memory.used \
      >> "$RES/$PART/gpu.csv" 2>&1 {lock}>&- & pid=$!   # the logger does not hold the lock: killed, it frees it
  fi
  stages "$student" "$method" "$size"; rc=$?
  [ -z "$pid" ] || { kill "$pid"; wait "$pid"; } 2> /dev/null
  [ $rc = 0 ] || return $rc
  gpu=$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
  echo "$((SECONDS - t0 + earlier))s on $gpu at $(git describe --always --dirty) $(date +%F)$( [ "$earlier" = 0 ] ||
    echo " (${earlier}s of it in an earlier run)")" > "$RES/$PART/done"
  echo "$PART done: $(cat "$RES/$PART/done")"
}

stages() {  # stages STUDENT METHOD SIZE: Stage 1, then the part's own stages
  local method=$2 size=$3 src="" L
  if [ "$size" = seqlen ]; then   # before Stage 1's minutes
    for L in $SEQLENS; do
      [ $((BATCH * SEQ_LEN % L)) = 0 ] || { echo "SEQLENS: $L does not divide BATCH x SEQ_LEN" >&2; return 2; }
    done
  fi
  stage1 "$1" || return 1
  [ "$method" = kl ] && src="--scores=$RES/score_$1/scores.json"
  if [ -z "$method" ]; then   # every layer scored
    st score $PY score.py --run_name="$RUN" --out_dir="$OUT_DIR" --budget=0.125,0.25,0.5 "${SCORE[@]}" &&
    cp "$OUT_DIR/$RUN/score/scores.json" "$RES/$PART/"
  elif [ "$method" = linear ]; then   # the all-linear bound
    hybrid linear none "$DISTILL_TOKENS"
  elif [ "$size" = seqlen ]; then   # the 25% hybrid up to the last snapshot, at each length: same tokens per step
    for L in $SEQLENS; do
      (BATCH=$((BATCH * SEQ_LEN / L)) SEQ_LEN=$L FINETUNE_TOKENS=0 PROMPTS=$(( (PROMPTS + 3) / 4 )) RULER=0
       RULER_ARGS=()
       hybrid "kl_25_s$L" "--method=kl --budget=0.25 $src" "${SNAPSHOTS##*,}") || return   # its status: 2 = refused
    done
  elif [ "$size" = 25 ]; then
    hybrid "${method}_25" "--method=$method --budget=0.25 $src" "$DISTILL_TOKENS" "$SNAPSHOTS"
  else
    hybrid "${method}_12" "--method=$method --budget=0.125 $src" "$SMALL_TOKENS" &&
    hybrid "${method}_50" "--method=$method --budget=0.5 $src" "$SMALL_TOKENS"
  fi
}

case "${1:-status}" in
  status)
    spent=0; left=0
    for p in $(parts); do
      if done_part "$p"; then
        echo "  done     $p  ($(cat "$RES/$p/done"))"; spent=$((spent + $(cut -d s -f 1 "$RES/$p/done")))
      else
        est=${ESTIMATE_MIN[${p%%_*}]:-${ESTIMATE_MIN[${p##*_}]}}
        note="" kept=$(finished "$p")
        [ -f "$RES/$p/times.txt" ] && note="; cut short, it resumes with the hybrids it finished: $kept"
        est=$((est - ${HYBRID_MIN[${p##*_}]:-0} * $(wc -w <<< "$kept")))
        left=$((left + est))
        echo "  pending  $p  (~$est GPU-min on one H200, estimated$note)"
      fi
    done
    if [ "$left" = 0 ]; then
      echo "GPU time: $((spent / 60)) min spent on the parts, all done; \`python results/report.py\`"
    else echo "GPU time: $((spent / 60)) min spent on the parts done, ~$left min left (less ~4 for each part that"
      echo "starts from a Stage 1 already on its machine)"
    fi ;;
  next)
    # GPU i runs in its own OUT_DIR (GPU 0 in OUT_DIR itself, GPU i > 0 in OUT_DIR/gpu<i>), so two parts of one
    # student can run at once, each with its own Stage 1; each GPU takes first a part whose student's Stage 1 is
    # already in its folder
    n=${2:-$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))')}; pids=(); taken=" "
    for ((i = 0; i < n; i++)); do
      out=$OUT_DIR; [ $i = 0 ] || out=$OUT_DIR/gpu$i
      ready=(); pending=()
      for p in $(parts); do
        done_part "$p" && continue
        case "$taken" in *" $p "*) continue ;; esac
        case "$p" in *_kl_*) done_part "score_$(student_of "$p")" || continue ;; esac
        if [ -f "$out/study_$(student_of "$p")/align/ckpt.pt" ]; then ready+=("$p"); else pending+=("$p"); fi
      done
      p=$(echo "${ready[@]}" "${pending[@]}" | awk '{print $1}')
      [ -n "$p" ] || break
      (OUT_DIR=$out CUDA_VISIBLE_DEVICES=$i part "$p") & pids+=($!); taken="$taken$p "
    done
    [ ${#pids[@]} = 0 ] && echo "no part can run now: see status"
    rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=1; done; exit $rc ;;
  part) part "${2:?part NAME}" ;;
  *) echo "usage: bash results/reproduce.sh status | next [N] | part NAME" >&2; exit 2 ;;
esac
