#!/usr/bin/env bash
# Session 8: the Qwen run again, after the first one ran out of GPU memory in score beside run.sh's score; run.sh
# resumes (data, transfer, align are done). Started by hand.
set -u
R=$HOME/res; cd $(cat $R/repo_path)
export NANOHYBRID_CACHE=$HOME/nhc PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
t() { echo "$(date +%T) $(date +%s) $*" >> $R/timeline.txt; }
Q=$HOME/nhc/Qwen2.5-Coder-0.5B-Instruct.gguf
t "Q2 runsh start"
ALIGN_ARGS="--steps=150" SCORE_ARGS="--steps=20 --eval_every=5 --patience=3" DISTILL_ARGS="--steps=150" \
FINETUNE_ARGS="--steps=150" EVAL_ARGS="--speed_lengths=1024,4096,16384" \
  timeout 900 bash run.sh --teacher=$Q --baseline=uniform --run=qwen > $R/Q2_runsh.log 2>&1; t "Q2 runsh rc=$?"
mkdir -p $R/qwen; cp -r out/qwen/logs $R/qwen/ 2>/dev/null; cp out/qwen/eval/* out/qwen/score/scores.json out/qwen/select/*.json $R/qwen/ 2>/dev/null
t "Q2 fin"
